"""Fixtures for tests that talk to real servers (PostgreSQL here; see tests/conformance for Redis).

``postgres_url``: a fresh, uniquely named database (``asyncthink_test_<hex>``) created through the
maintenance database of ``ASYNCTHINK_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``) for the test session, dropped at the end.
When the server cannot be reached the test is skipped with the reason, except in CI (env ``CI`` set),
where an unreachable PostgreSQL is a failure: CI must start it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from shared.store.db import StoreUnavailable, check_connection, normalize_url
from tests.missing import missing

PG_HINT = "start it: pg_ctlcluster <version> main start (apt-get install postgresql)"

POSTGRES_ADMIN_URL = os.environ.get(
    "ASYNCTHINK_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def require_postgres(url: str = POSTGRES_ADMIN_URL) -> None:
    """Skip (or, in CI, fail) the calling test when PostgreSQL at ``url`` cannot be reached."""
    try:
        check_connection(url, connect_timeout=3)
    except StoreUnavailable as exc:
        missing(f"PostgreSQL is unreachable: {exc}", f"{PG_HINT}, or point ASYNCTHINK_TEST_POSTGRES_URL at a server")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    require_postgres()
    admin = normalize_url(POSTGRES_ADMIN_URL)
    name = f"asyncthink_test_{secrets.token_hex(6)}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()
