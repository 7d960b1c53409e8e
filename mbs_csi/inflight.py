"""One call at a time per volume, snapshot or name: a conflicting call answers ABORTED at once (the CO
retries).

A call that only reads a volume (a snapshot of it, a clone of it) holds it *shared*: several may run
together, and none may run while a call holds it *exclusively* (delete, expand, publish).

Several controller replicas share a PostgreSQL database, and each sidecar elects its leader on its own:
the provisioner's leader may run in one replica and the snapshotter's in another. So with PostgreSQL the
same keys are also taken as advisory locks in the database (:class:`DatabaseLocks`), which every replica
sees; a replica that dies loses its connections, and PostgreSQL releases its locks with them.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from mbs_csi import errors, secrets


def lock_id(key: str) -> int:
    """The 64-bit advisory lock number of ``key``, the same in every replica."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


class DatabaseLocks:
    """PostgreSQL session advisory locks, each call holding one pooled connection while it runs."""

    def __init__(self, url: str, connections: int) -> None:
        import sqlalchemy  # the controller's stack; only a controller with PostgreSQL gets here

        self._text = sqlalchemy.text
        self._url = secrets.redact_url(url)
        self._engine = sqlalchemy.create_engine(
            url, pool_size=connections, max_overflow=0, pool_pre_ping=True, connect_args={"connect_timeout": 5}
        )

    @contextmanager
    def hold(self, exclusive: Iterable[str], shared: Iterable[str]) -> Iterator[None]:
        try:
            connection: Any = self._engine.connect()
        except Exception as exc:
            raise errors.Unavailable(f"cannot lock in database {self._url}: {errors.database_reason(exc)}") from None
        try:
            wanted = [("pg_try_advisory_lock", k) for k in sorted(exclusive)]
            wanted += [("pg_try_advisory_lock_shared", k) for k in sorted(shared)]
            for function, key in wanted:
                if not connection.execute(self._text(f"SELECT {function}(:id)"), {"id": lock_id(key)}).scalar():
                    raise errors.Aborted(
                        f"an operation on {key} is already in progress in another controller replica; retry later"
                    )
            yield
        finally:
            try:
                connection.execute(self._text("SELECT pg_advisory_unlock_all()"))
            except Exception:
                connection.invalidate()  # closing the session is what releases its locks then
            connection.close()


class InFlight:
    def __init__(self, database_locks: DatabaseLocks | None = None) -> None:
        self._lock = threading.Lock()
        self._exclusive: set[str] = set()
        self._shared: Counter[str] = Counter()
        self._database_locks = database_locks

    @contextmanager
    def hold(self, *keys: str, shared: Iterable[str] = ()) -> Iterator[None]:
        """Hold ``keys`` exclusively and ``shared`` shared for the duration, or raise Aborted holding none."""
        exclusive = {k for k in keys if k}
        readers = {k for k in shared if k} - exclusive
        with self._lock:
            busy = sorted((exclusive & (self._exclusive | set(self._shared))) | (readers & self._exclusive))
            if busy:
                raise errors.Aborted(f"an operation on {busy[0]} is already in progress; retry later")
            self._exclusive |= exclusive
            self._shared.update(readers)
        try:
            across = self._database_locks.hold(exclusive, readers) if self._database_locks else nullcontext()
            with across:
                yield
        finally:
            with self._lock:
                self._exclusive -= exclusive
                self._shared.subtract(readers)
                self._shared += Counter()  # drop keys whose count fell to zero
