"""The REST gateway (FastAPI): submit problems, read and follow episodes, OpenAI-compatible chat.

Start it with ``python -m services.gateway`` (or ``asyncthink serve gateway``); build it in code with
:func:`services.gateway.app.create_app`. See :mod:`services.gateway.app` for the embedded and the
distributed setups.
"""
