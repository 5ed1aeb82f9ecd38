"""The scenario suite: one set of scripted episodes run against the embedded and the distributed setup."""
