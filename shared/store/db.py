"""Engines, sessions, migrations and a connection check for the trace store.

* :func:`make_engine` builds an engine for a SQLAlchemy URL. SQLite (the embedded default): the
  parent directory of the file is created, and every connection turns on foreign keys, WAL and a
  busy timeout. PostgreSQL: ``postgresql://`` means psycopg 3, and connecting times out after
  ``connect_timeout`` seconds instead of hanging.
* :func:`session_factory` makes sessions that keep their objects readable after commit.
* :func:`migrate` runs ``alembic upgrade head`` with a Config built in code, so it works from any
  working directory (``shared/store/alembic.ini`` is only for the ``alembic`` command line).
* :func:`check_connection` raises :class:`StoreUnavailable`, which names the URL (password masked) and
  says how to fix it.

Limits: no schema is created without Alembic (there is no ``create_all`` path), and nothing here
retries; callers decide whether to wait for the database.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

STORE_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = STORE_DIR / "migrations"
DEFAULT_CONNECT_TIMEOUT_S = 5


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or used; the message says which URL and how to fix it."""


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; a bare ``postgresql://`` / ``postgres://`` URL selects the psycopg 3 driver."""
    u = make_url(url) if isinstance(url, str) else url
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def mask_url(url: str | URL) -> str:
    """The URL as text with its password replaced by ``***``."""
    try:
        return normalize_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: show nothing that could be a secret
        return "<unparsable database URL>"


def _is_sqlite_memory(u: URL) -> bool:
    return u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:")


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA journal_mode=WAL")  # a no-op answer ("memory") for in-memory databases
    cur.close()


def make_engine(
    url: str | URL, *, echo: bool = False, connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_S
) -> Engine:
    """An engine for ``url`` (SQLite or PostgreSQL) set up as the module docstring describes."""
    u = normalize_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if u.get_backend_name() == "sqlite":
        if _is_sqlite_memory(u):
            # One shared connection, or every checkout would see a different empty database.
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            Path(str(u.database)).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 5.0}
        engine = create_engine(u, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if u.get_backend_name() == "postgresql":
        # libpq treats connect_timeout values below 2 as 2.
        kwargs["connect_args"] = {"connect_timeout": max(2, int(connect_timeout))}
        kwargs["pool_pre_ping"] = True
    return create_engine(u, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def _unavailable(url: str | URL, exc: BaseException) -> StoreUnavailable:
    u = normalize_url(url) if not isinstance(exc, ValueError) else None
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    why = reason[0] if reason else type(exc).__name__
    where = mask_url(url)
    if u is not None and u.get_backend_name() == "sqlite":
        hint = (
            "check that the directory is writable and the file is a SQLite database, "
            "or set DATABASE_URL to another location"
        )
    elif "does not exist" in why and "database" in why:
        hint = (
            f"create it (e.g. `createdb -h {u.host if u else 'HOST'} -U {u.username if u else 'USER'} "
            f"{u.database if u else 'NAME'}`) or set DATABASE_URL to an existing database"
        )
    elif "password" in why or "authentication" in why:
        hint = "check the user and password in DATABASE_URL"
    else:
        hint = (
            "is PostgreSQL running and accepting TCP connections on that host and port? "
            "Start it, or set DATABASE_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/asyncthink, "
            "or sqlite:///asyncthink.db for the embedded setup)"
        )
    return StoreUnavailable(f"cannot use the database at {where}: {why}. Fix: {hint}.")


def check_connection(url: str | URL, *, connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Connect and run ``SELECT 1``; raise :class:`StoreUnavailable` (fast, with a fix) on failure."""
    try:
        engine = make_engine(url, connect_timeout=connect_timeout)
    except (ValueError, OSError) as exc:  # unparsable URL, or a SQLite directory we cannot create
        raise _unavailable(url, exc) from exc
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (OperationalError, DBAPIError, sqlite3.Error, OSError) as exc:
        raise _unavailable(url, exc) from exc
    finally:
        engine.dispose()


def alembic_config(url: str | URL | None = None, *, connection: Connection | None = None) -> Config:
    """An Alembic Config built in code: scripts in ``shared/store/migrations``, the given URL/connection.

    With ``connection`` the migration runs on it (and inside its transaction); otherwise ``env.py``
    connects to ``url`` itself, or to ``Settings.database_url`` when neither is given.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        # configparser interpolates '%': escape it so URL-encoded passwords survive.
        cfg.set_main_option(
            "sqlalchemy.url", normalize_url(url).render_as_string(hide_password=False).replace("%", "%%")
        )
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _connect(engine: Engine, url: str | URL) -> Connection:
    try:
        return engine.connect()
    except (OperationalError, DBAPIError, sqlite3.Error, OSError) as exc:
        raise _unavailable(url, exc) from exc


def migrate(url: str | URL, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (``head``: the latest schema), in one transaction.

    Raises :class:`StoreUnavailable` when the database cannot be reached; errors of the migration
    itself propagate unchanged.
    """
    engine = make_engine(url)
    try:
        with _connect(engine, url) as conn, conn.begin():
            command.upgrade(alembic_config(url, connection=conn), revision)
    finally:
        engine.dispose()


def downgrade(url: str | URL, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision`` (``base``: drop every table of the store)."""
    engine = make_engine(url)
    try:
        with _connect(engine, url) as conn, conn.begin():
            command.downgrade(alembic_config(url, connection=conn), revision)
    finally:
        engine.dispose()
