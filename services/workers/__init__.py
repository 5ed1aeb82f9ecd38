"""The worker service: the Celery app, its tasks, the tool workers and the engine-side endpoint."""
