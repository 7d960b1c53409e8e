"""The SQLAlchemy engine behind cinderlib's database persistence, as a backend worker uses it."""

from __future__ import annotations

from typing import Any

import sqlalchemy
from cinder.db.sqlalchemy import api as cinder_db


def engine() -> sqlalchemy.engine.Engine:
    """cinder's engine (cinderlib must be set up), tuned when it is the embedded SQLite database."""
    found = cinder_db.get_engine()
    if found.dialect.name == "sqlite":
        _tune_sqlite(found)
    return found


def _tune_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Make the embedded SQLite database cheap to use from several worker processes.

    - Keep connections open: SQLAlchemy 1.4 opens a new SQLite connection for every transaction
      (NullPool), which costs more than the statements themselves. A worker runs one call at a time,
      so a small pool suffices. (SQLAlchemy 2 pools SQLite connections by default.)
    - Write-ahead log: readers no longer wait for a writer in another worker, and a commit costs one
      fsync instead of several. ``synchronous=FULL`` keeps every commit durable.
    """
    old = engine.pool
    # Same connection factory and event listeners (oslo.db's among them), pooled.
    engine.pool = sqlalchemy.pool.QueuePool(
        old._creator, pool_size=1, max_overflow=4, dialect=old._dialect, _dispatch=old.dispatch
    )
    old.dispose()

    @sqlalchemy.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()
