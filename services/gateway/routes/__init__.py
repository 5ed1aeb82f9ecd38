"""The gateway's routers, one module per concern: problems, episodes, events, OpenAI-compatible, health."""
