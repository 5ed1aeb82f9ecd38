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

People in the loop (the gateway's pages under ``/ui``, ``ASYNCTHINK_HUMAN_PAGES``): people sign in with a key
of scope ``human`` and get a session cookie signed with ``ASYNCTHINK_SECRET_KEY`` (at least 32 characters,
the same on every gateway replica). Outside development the gateway refuses to serve the pages without it
(:meth:`Settings.check_secret_key`); in development a missing one is replaced by a random key per process
(sessions then end when the gateway restarts). The ``ASYNCTHINK_HUMAN_*`` settings are the human queue's
clocks: the claim lease (renewed while a person's page is open), the deadline of a task and what happens
when it passes (``model``: a model worker gets the sub-query with the person's partial answer; ``default``:
the join reads ``ASYNCTHINK_HUMAN_FALLBACK_TEXT``; ``error``: the join reads an error text), the undo window
before a join consumes an answer, and the named pools (``<FORK-i@human:POOL>``).
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.episode import MAX_CAPACITY

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "asyncthink-countdown-small"
MIN_ADMIN_KEY_CHARS = 32

AuthMode = Literal["auto", "keys", "off"]
HumanFallback = Literal["model", "default", "error"]
_POOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


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

    # people in the loop (see the module docstring)
    secret_key: SecretStr | None = None  # ASYNCTHINK_SECRET_KEY: signs session cookies, >= 32 characters
    human_pages: bool = True  # serve the pages for people (/ui) from the gateway
    human_pools: str = ""  # comma-separated pool names besides the default one: <FORK-i@human:POOL>
    human_lease_s: float = Field(30.0, ge=2, le=3600)  # a claim lasts this long unless the page renews it
    human_deadline_s: float = Field(600.0, ge=1, le=7 * 24 * 3600)  # a task's deadline (SLA) after its fork
    human_fallback: HumanFallback = "model"  # what a task whose deadline passed returns to its join
    human_fallback_text: str = Field("[no answer from a person in time]", max_length=4096)  # for "default"
    human_undo_s: float = Field(5.0, ge=0, le=300)  # after a submit, how long the person may take it back
    human_poll_s: float = Field(0.5, gt=0, le=30)  # how often a waiting join looks at its task when idle
    human_organizer_idle_s: float = Field(1800.0, ge=1, le=24 * 3600)  # a human organizer silent this long: failed

    @field_validator("admin_key", "secret_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("admin_key", "secret_key")
    @classmethod
    def _strong_key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return None
        name = f"ASYNCTHINK_{str(info.field_name).upper()}"
        key = value.get_secret_value()
        if key.lower().startswith("change-me"):
            raise ValueError(f"{name} is still the placeholder; set it to `openssl rand -hex 32`")
        if len(key) < MIN_ADMIN_KEY_CHARS:
            raise ValueError(
                f"{name} must be at least {MIN_ADMIN_KEY_CHARS} characters "
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

    @field_validator("human_pools")
    @classmethod
    def _pool_names(cls, value: str) -> str:
        for name in (p.strip() for p in value.split(",") if p.strip()):
            if not _POOL.match(name):
                raise ValueError(
                    f"ASYNCTHINK_HUMAN_POOLS: {name[:40]!r} is not a pool name (letters, digits, '_', '.', '-'; "
                    "at most 32 characters)"
                )
        return value

    @property
    def pools(self) -> list[str]:
        """The named pools of the human queue, besides ``default`` (``<FORK-i@human>``)."""
        return list(dict.fromkeys(p.strip() for p in self.human_pools.split(",") if p.strip() and p.strip() != "default"))

    def check_secret_key(self) -> None:
        """InsecureSettings when the pages for people would be served outside development without
        ``ASYNCTHINK_SECRET_KEY`` (session cookies must be signed with a key every replica shares)."""
        if self.human_pages and self.environment != "development" and self.secret_key is None:
            raise InsecureSettings(
                f"ASYNCTHINK_SECRET_KEY is required in {self.environment}: the gateway's pages for people (/ui) "
                "sign their session cookies with it. Set it to at least 32 random characters (`openssl rand -hex 32`), "
                "the same on every gateway replica, or turn the pages off with ASYNCTHINK_HUMAN_PAGES=false"
            )

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
