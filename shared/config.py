"""One settings object per process (pydantic-settings), read from ``ASYNCTHINK_*`` environment variables.

``DATABASE_URL`` and ``REDIS_URL`` are also read without the prefix, as deployment tools expect.
Defaults are the embedded setup: a SQLite file in the working directory, the in-process bus, and the
model shipped under ``models/``. Outside development, a default secret is refused.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "asyncthink-countdown-small"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASYNCTHINK_", env_file=".env", extra="ignore")

    environment: str = "development"  # development | production
    database_url: str = Field(
        default="sqlite:///asyncthink.db",
        validation_alias=AliasChoices("ASYNCTHINK_DATABASE_URL", "DATABASE_URL"),
    )  # SQLAlchemy URL; postgresql+psycopg://user@host/db in production
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("ASYNCTHINK_REDIS_URL", "REDIS_URL"),
    )  # the bus and the Celery broker in the distributed setup
    bus: str = "inprocess"  # inprocess | redis
    model: str = str(DEFAULT_MODEL_DIR)  # a local model directory, or sglang:URL / openai:URL#model
    device: str = "cpu"  # torch device for the in-process transformers backend
    secret_key: str = "dev-secret-change-me"  # signs the human-review queue's session cookies
    request_timeout_s: float = 60.0  # timeout for every external HTTP call
    # The longest a forked worker may run: the organizer caps each episode's worker timeout at it, and the
    # Celery workers derive their task time limits from it (services/workers/app.py).
    worker_timeout_s: float = Field(default=300.0, gt=0)
    # How long a Celery worker's task stays invisible to other workers without its heartbeat: a killed
    # worker's task is delivered again about this long after its last heartbeat. None: derived from
    # worker_timeout_s (a tenth of it, between 5 and 30 s).
    task_lease_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _no_default_secret_in_production(self) -> Settings:
        if self.environment != "development" and self.secret_key == "dev-secret-change-me":
            raise ValueError("set ASYNCTHINK_SECRET_KEY: the default secret is only allowed in development")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
