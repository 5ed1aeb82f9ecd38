"""The trace store: SQLAlchemy tables, Alembic migrations and repository functions.

``DATABASE_URL`` picks the backend: SQLite for the embedded default, PostgreSQL for the services.
Typical use::

    from shared.store import make_engine, migrate, session_factory, repository
    migrate(url)
    Session = session_factory(make_engine(url))
    with Session() as session:
        repository.save_episode(session, result=result)

Importing this package imports SQLAlchemy but not the engine, models or torch.
"""

from shared.store import repository
from shared.store.db import (
    StoreUnavailable,
    check_connection,
    make_engine,
    mask_url,
    migrate,
    session_factory,
)
from shared.store.models import ApiKey, Base, Episode, ModelVersion, ProblemRow, Segment
from shared.store.repository import EpisodeNotFound, ProblemConflict

__all__ = [
    "ApiKey",
    "Base",
    "Episode",
    "EpisodeNotFound",
    "ModelVersion",
    "ProblemConflict",
    "ProblemRow",
    "Segment",
    "StoreUnavailable",
    "check_connection",
    "make_engine",
    "mask_url",
    "migrate",
    "repository",
    "session_factory",
]
