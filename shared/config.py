"""One settings object per process (pydantic-settings), read from ``ASYNCTHINK_*`` environment variables.

``DATABASE_URL`` and ``REDIS_URL`` are also read without the prefix, as deployment tools expect.
Defaults are the embedded setup: a SQLite file in the working directory, the in-process bus, and the
model shipped under ``models/``.

Authentication (``ASYNCTHINK_AUTH``), see :meth:`Settings.requires_keys`:

* ``keys``: every route but ``/healthz`` and ``/readyz`` needs an API key;
* ``off``: no keys, allowed only in development and only on loopback: binding another interface refuses
  to start, and a request that reaches the gateway on a non-loopback address is refused;
* ``auto`` (default): ``off`` when the gateway binds a loopback address in development, ``keys`` otherwise.

Any environment other than ``development`` (``ASYNCTHINK_ENVIRONMENT=production``) always requires keys.
``ASYNCTHINK_ADMIN_KEY`` is a bootstrap admin key (at least 32 characters), so an operator (or CI) can
get in before any key exists; it is held hashed.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.episode import MAX_CAPACITY

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "asyncthink-countdown-small"
MIN_ADMIN_KEY_CHARS = 32

AuthMode = Literal["auto", "keys", "off"]


class InsecureSettings(ValueError):
    """Settings that would serve the API without keys where that is not allowed; the message says how to fix it."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or a server address) is a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    )  # the bus, the Celery broker and the gateway's rate limits in the distributed setup
    bus: str = "inprocess"  # inprocess | redis
    model: str = str(DEFAULT_MODEL_DIR)  # a local model directory, or sglang:URL / openai:URL#model
    device: str = "cpu"  # torch device for the in-process transformers backend
    request_timeout_s: float = 60.0  # timeout for every external HTTP call
    max_body_bytes: int = Field(1024 * 1024, ge=1024)  # gateway: larger request bodies get a 413
    auth: AuthMode = "auto"  # keys | off | auto (see the module docstring)
    admin_key: SecretStr | None = None  # ASYNCTHINK_ADMIN_KEY: bootstrap admin key, >= 32 characters
    rate_limit_per_minute: int = Field(600, ge=0)  # per key, unless the key sets its own; 0 = no limit
    auth_cache_s: float = Field(2.0, ge=0, le=60)  # a verified key is trusted this long (revocation delay)

    @field_validator("admin_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("admin_key")
    @classmethod
    def _strong_admin_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        key = value.get_secret_value()
        if key.lower().startswith("change-me"):
            raise ValueError("ASYNCTHINK_ADMIN_KEY is still the placeholder; set it to `openssl rand -hex 32`")
        if len(key) < MIN_ADMIN_KEY_CHARS:
            raise ValueError(
                f"ASYNCTHINK_ADMIN_KEY must be at least {MIN_ADMIN_KEY_CHARS} characters "
                "(generate one with `openssl rand -hex 32`)"
            )
        return value
    # The longest a forked worker may run: the organizer caps each episode's worker timeout at it, and the
    # Celery workers derive their task time limits from it (services/workers/app.py).
    worker_timeout_s: float = Field(default=300.0, gt=0)
    # How long a Celery worker's task stays invisible to other workers without its heartbeat: a killed
    # worker's task is delivered again about this long after its last heartbeat. None: derived from
    # worker_timeout_s (a tenth of it, between 5 and 30 s).
    task_lease_s: float | None = Field(default=None, gt=0)

    # --- scale (docs/scaling.md)
    # The largest agent pool c a request may ask for here (shared.episode.MAX_CAPACITY bounds it); the
    # gateway answers 422 above it.
    max_capacity: int = Field(default=1024, ge=1, le=MAX_CAPACITY)
    # Backpressure at the gateway: 429 with Retry-After when the problems stream holds more than
    # max_queued_episodes entries no organizer has taken yet, or more than max_episodes_in_flight
    # submitted and not finished (queued plus running); 0: no bound.
    max_queued_episodes: int = Field(default=10_000, ge=0)
    max_episodes_in_flight: int = Field(default=0, ge=0)
    retry_after_s: int = Field(default=2, ge=1, le=3600)  # the Retry-After of those 429s
    # Redis connections per process (a bounded pool: a command waits for a free connection, never fails
    # for want of one). 0: sized from the process's concurrency (the organizer: 8 + a quarter of its
    # episodes; the gateway: 256, since every SSE follower holds one while it waits).
    redis_max_connections: int = Field(default=0, ge=0)
    # Order of queued worker tasks when workers are scarce: critical-path (tasks a join already waits for
    # first, then by fork time) or fifo.
    scheduling: Literal["critical-path", "fifo"] = "critical-path"
    # A finished episode's event and result streams and its workers' done-markers expire this long after
    # it ends (its stored record stays); 0: none set at the end (what a Celery worker wrote still carries
    # its own 24-hour TTL, so no per-episode key lives forever).
    stream_ttl_s: float = Field(default=3600.0, ge=0)

    @model_validator(mode="after")
    def _keys_outside_development(self) -> Settings:
        if self.environment != "development" and self.auth == "off":
            raise ValueError(
                f"ASYNCTHINK_AUTH=off is not allowed in {self.environment}: the API always needs keys there. "
                "Unset ASYNCTHINK_AUTH (or set it to keys) and create keys with `asyncthink keys create`, "
                "or set ASYNCTHINK_ADMIN_KEY"
            )
        return self

    def requires_keys(self, bind_host: str | None) -> bool:
        """Whether the gateway bound to ``bind_host`` (None: not known, e.g. an app served in-process) needs
        API keys. InsecureSettings when ``auth=off`` would serve another interface than loopback."""
        if self.environment != "development" or self.auth == "keys":
            return True
        if self.auth == "off":
            if bind_host is not None and not is_loopback(bind_host):
                raise InsecureSettings(
                    f"refusing to serve the API without keys on {bind_host}: ASYNCTHINK_AUTH=off is only "
                    "allowed on loopback. Either bind loopback (--host 127.0.0.1), or require keys "
                    "(ASYNCTHINK_AUTH=keys, or unset it) and create one with `asyncthink keys create --name NAME "
                    "--scope submit --scope read`, or set ASYNCTHINK_ADMIN_KEY"
                )
            return False
        return bind_host is not None and not is_loopback(bind_host)


def settings_error(err: Exception) -> str:
    """A settings error as one line per problem, for a command line (no pydantic links)."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in errors())
    return str(err)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
