"""Readiness: the checks behind Identity.Probe.

Each role registers the checks for what it depends on. A failing check makes Probe answer
``ready=false`` and logs why; it never stops the server, so the driver comes back by itself once the
database or backend does.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mbs_csi import errors, secrets

log = logging.getLogger(__name__)

# A check returns None when healthy, or a sentence saying what is wrong.
Check = Callable[[], str | None]


class Readiness:
    """Runs the registered checks; logs a problem when it appears and again when it clears."""

    def __init__(self, checks: Iterable[Check] = ()) -> None:
        self._checks = list(checks)
        self._lock = threading.Lock()
        self._last: tuple[str, ...] = ()

    def add(self, check: Check) -> None:
        self._checks.append(check)

    def problems(self) -> list[str]:
        found = [p for p in (check() for check in self._checks) if p]
        with self._lock:
            changed = tuple(found) != self._last
            self._last = tuple(found)
        if changed and found:
            log.warning("not ready: %s", "; ".join(found))
        elif changed:
            log.info("ready")
        return found


class StateDirWritable:
    """The node's state dir (its attachment store lives there) exists and takes a write."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> str | None:
        probe = self.path / f".probe-{os.getpid()}-{threading.get_ident()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            return f"state dir {self.path} is not writable ({exc.strerror or exc}); fix its mount or permissions"
        return None


class DatabaseReachable:
    """The controller's database answers ``SELECT 1`` within ``timeout`` seconds."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self._engine: Any = None

    def __call__(self) -> str | None:
        try:
            if self.url.startswith("sqlite:///"):
                self._check_sqlite(self.url.removeprefix("sqlite:///"))
            else:
                self._check_sqlalchemy()
        except Exception as exc:  # any driver error means "not reachable"; say which and why
            return f"database {secrets.redact_url(self.url)} is not reachable: {errors.database_reason(exc)}"
        return None

    def _check_sqlite(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path, timeout=self.timeout) as conn:
            conn.execute("SELECT 1").fetchone()
        conn.close()

    def _check_sqlalchemy(self) -> None:
        # Imported here: only the controller role has SQLAlchemy installed.
        import sqlalchemy

        if self._engine is None:
            connect_args = {"connect_timeout": max(1, int(self.timeout))} if self.url.startswith("postgres") else {}
            self._engine = sqlalchemy.create_engine(
                self.url, pool_pre_ping=True, pool_size=1, max_overflow=0, connect_args=connect_args
            )
        with self._engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
