"""Fixtures for the human queue's unit tests: a migrated SQLite store and the in-process bus."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.store import db


@pytest.fixture
def sessions(tmp_path: Path) -> Callable[[], Any]:
    url = f"sqlite:///{tmp_path / 'people.db'}"
    db.migrate(url)
    return db.session_factory(db.make_engine(url))
