"""The store under test, once per backend: SQLite (a temp file) and PostgreSQL (``integration``).

``store`` yields a :class:`StoreUnderTest` with a migrated, empty database. SQLite gets a new file per
test; PostgreSQL migrates the session's fresh database once and empties the tables after each test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from shared.store.db import make_engine, migrate, session_factory

TABLES = ("segments", "episodes", "problems", "model_versions", "api_keys", "human_tasks", "human_audit", "plans")


@dataclass
class StoreUnderTest:
    backend: str  # "sqlite" | "postgresql"
    url: str
    engine: Engine
    sessions: sessionmaker[Session]


@pytest.fixture(scope="session")
def migrated_postgres_url(postgres_url: str) -> str:
    migrate(postgres_url)
    return postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'store.db'}"
        migrate(url)
    else:
        url = request.getfixturevalue("migrated_postgres_url")
    engine = make_engine(url)
    try:
        yield StoreUnderTest(request.param, url, engine, session_factory(engine))
    finally:
        if request.param == "postgresql":
            with engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        engine.dispose()


@pytest.fixture
def session(store: StoreUnderTest) -> Iterator[Session]:
    with store.sessions() as s:
        yield s
