"""Engines, URL handling, migrations from any directory, and the unreachable-database error."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from shared.store.db import (
    DEFAULT_CONNECT_TIMEOUT_S,
    StoreUnavailable,
    check_connection,
    make_engine,
    mask_url,
    migrate,
    normalize_url,
)
from tests.helpers import recorded_connects

UNREACHABLE = "postgresql+psycopg://asyncthink:s3cret@127.0.0.1:1/asyncthink"


def test_unreachable_postgres_error_is_clear_and_fast() -> None:
    """Fast: one connection attempt, with libpq's connect_timeout set (counted, not timed)."""
    with recorded_connects() as attempts, pytest.raises(StoreUnavailable) as info:
        check_connection(UNREACHABLE)
    assert [a.get("connect_timeout") for a in attempts] == [DEFAULT_CONNECT_TIMEOUT_S]
    msg = str(info.value)
    assert "127.0.0.1:1" in msg and "s3cret" not in msg and "***" in msg
    assert "PostgreSQL running" in msg and "DATABASE_URL" in msg


def test_migrate_on_unreachable_database_raises_store_unavailable() -> None:
    with recorded_connects() as attempts, pytest.raises(StoreUnavailable, match="127.0.0.1:1"):
        migrate(UNREACHABLE)
    assert [a.get("connect_timeout") for a in attempts] == [DEFAULT_CONNECT_TIMEOUT_S]  # once, bounded


def test_connect_timeout_reaches_the_driver_at_least_2_s() -> None:
    for asked, sent in ((1, 2), (2, 2), (7, 7)):  # libpq reads values below 2 as 2: max(2, asked)
        engine = make_engine(UNREACHABLE, connect_timeout=asked)
        with recorded_connects() as attempts, pytest.raises(Exception, match="127.0.0.1"):
            engine.connect()
        engine.dispose()
        assert [a["connect_timeout"] for a in attempts] == [sent]


def test_sqlite_path_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="DATABASE_URL"):
        check_connection(f"sqlite:///{blocker / 'sub' / 'x.db'}")


def test_urls() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    assert mask_url("postgresql://u:pw@h:5/db") == "postgresql+psycopg://u:***@h:5/db"


def test_sqlite_engine_creates_directory_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "x.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()
    assert path.parent.is_dir()
    check_connection(f"sqlite:///{path}")


def test_migrate_does_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    migrate(url)
    migrate(url)  # already at head: a no-op
    engine = make_engine(url)
    assert {"problems", "episodes", "segments", "model_versions"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_in_memory_sqlite_shares_one_database() -> None:
    engine = make_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM t")).scalar() == 0
    engine.dispose()
