"""Fixtures of the fault tests: a Redis database of their own, a TCP proxy that cuts it, and processes.

The fault tests use ``ASYNCTHINK_FAULTS_REDIS_URL`` (default ``redis://127.0.0.1:6379/12``), a database no
other suite uses: its Celery queues must hold no leftovers of an aborted run, so its keys are deleted when
the session starts (only that database's). PostgreSQL comes from ``tests/integration/conftest.py``
(``postgres_url``: a fresh database for the session). When Redis cannot be reached the tests are skipped,
unless ``CI`` is set, where that is a failure.

``proxy``: a :class:`bench.tcp_proxy.TcpProxy` in front of that Redis server; a client pointed at
``proxy.url(path=...)`` loses Redis while the test holds a cut, everything else keeps it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from bench.tcp_proxy import TcpProxy

FAULTS_REDIS_URL = os.environ.get("ASYNCTHINK_FAULTS_REDIS_URL", "redis://127.0.0.1:6379/12")


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
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but Redis at {FAULTS_REDIS_URL} is unreachable; CI must start it: {exc}")
        pytest.skip(f"Redis at {FAULTS_REDIS_URL} unreachable (set CI=1 to make this a failure): {exc}")
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
