"""The SQLAlchemy engine behind cinderlib's database persistence, as a backend worker uses it."""

from __future__ import annotations

from typing import Any

import sqlalchemy
from cinder.db.sqlalchemy import api as cinder_db

# On PostgreSQL, the shares of ``backend_timeout`` that one lock wait, and one statement (its lock waits
# included), may take. Both end well before the front gives the call up and replaces the worker: the
# worker answers UNAVAILABLE itself, and its session leaves no lock waiting behind it.
LOCK_TIMEOUT_SHARE = 0.25
STATEMENT_TIMEOUT_SHARE = 0.5


def engine(backend_timeout: float) -> sqlalchemy.engine.Engine:
    """cinder's engine (cinderlib must be set up), tuned for its database: the embedded SQLite one, or
    PostgreSQL with its waits bounded by ``backend_timeout`` (seconds a backend call may take)."""
    found = cinder_db.get_engine()
    if found.dialect.name == "sqlite":
        _tune_sqlite(found)
    elif found.dialect.name == "postgresql":
        _bound_postgresql(found, backend_timeout)
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


def postgresql_options(backend_timeout: float) -> str:
    """The PostgreSQL session settings (libpq ``options``) that bound a worker's lock waits and statements."""
    lock_ms = max(1, round(backend_timeout * 1000 * LOCK_TIMEOUT_SHARE))
    statement_ms = max(1, round(backend_timeout * 1000 * STATEMENT_TIMEOUT_SHARE))
    return f"-c lock_timeout={lock_ms} -c statement_timeout={statement_ms}"


def _bound_postgresql(engine: sqlalchemy.engine.Engine, backend_timeout: float) -> None:
    """Open every PostgreSQL session with :func:`postgresql_options`: a row another session holds, or a
    database that stopped answering mid-statement, fails the statement in time (UNAVAILABLE, see
    ``failures.py``) instead of holding the call until the front gives up."""
    options = postgresql_options(backend_timeout)

    @sqlalchemy.event.listens_for(engine, "do_connect")
    def _session_options(_dialect: Any, _record: Any, _args: Any, params: dict[str, Any]) -> None:
        params["options"] = " ".join(filter(None, (params.get("options"), options)))

    engine.dispose()  # connections opened before (cinderlib's set-up) come back with the options
