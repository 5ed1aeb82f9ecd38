"""Fixtures of the fault tests: a Redis database of their own, a TCP proxy that cuts it, and processes.

The fault tests use ``ASYNCTHINK_FAULTS_REDIS_URL`` (default ``redis://127.0.0.1:6379/12``), a database no
other suite uses: its Celery queues must hold no leftovers of an aborted run, so its keys are deleted when
the session starts (only that database's). ``faults_pg_url``: a PostgreSQL database of their own, created
(and migrated) through ``ASYNCTHINK_FAULTS_PG_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``, used only to create and drop it) and dropped at
the end. When Redis or PostgreSQL cannot be reached the tests are skipped, unless ``CI`` is set, where
that is a failure.

``proxy``: a :class:`bench.tcp_proxy.TcpProxy` in front of that Redis server; a client pointed at
``proxy.url(path=...)`` loses Redis while the test holds a cut, everything else keeps it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from bench.tcp_proxy import TcpProxy
from tests.missing import missing

FAULTS_REDIS_URL = os.environ.get("ASYNCTHINK_FAULTS_REDIS_URL", "redis://127.0.0.1:6379/12")
FAULTS_PG_URL = os.environ.get("ASYNCTHINK_FAULTS_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _unreachable(what: str, exc: BaseException) -> None:
    missing(f"{what} is unreachable: {exc}", "start it (see tests/integration/faults/conftest.py for the URLs it reads)")


def redis_db_path(url: str = FAULTS_REDIS_URL) -> str:
    """The ``/<db>`` part of a Redis URL (what a client behind the proxy must select)."""
    return urlsplit(url).path or "/0"


@pytest.fixture(scope="session")
def faults_redis() -> str:
    import redis

    client = redis.Redis.from_url(FAULTS_REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unreachable(f"Redis at {FAULTS_REDIS_URL}", exc)
    keys = list(client.scan_iter(count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    return FAULTS_REDIS_URL


@pytest.fixture
def proxy(faults_redis: str) -> Iterator[TcpProxy]:
    parts = urlsplit(faults_redis)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as p:
        yield p


def pg_conninfo(url: str = FAULTS_PG_URL) -> str:
    from sqlalchemy.engine import make_url

    admin = make_url(url)
    conninfo = f"host={admin.host} port={admin.port or 5432} user={admin.username} dbname={admin.database}"
    return conninfo + (f" password={admin.password}" if admin.password else "")


@pytest.fixture(scope="session")
def faults_pg_url() -> Iterator[str]:
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    from shared.store import db

    name = f"asyncthink_faults_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(pg_conninfo(), autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        _unreachable(f"PostgreSQL at {FAULTS_PG_URL}", exc)
    url = make_url(FAULTS_PG_URL).set(database=name).render_as_string(hide_password=False)
    db.migrate(url)
    yield url
    with psycopg.connect(pg_conninfo(), autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
