"""What a fault test checks once its storm is over, and the findings it collects on the way.

Findings are kept by check (a process left, a slow call, a volume left locked, a crossed answer, a
request that never answered OK, an orphan on the storage or in the database) so that a failing test
lists every check that failed, not just the first.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from testkit import loop, processes
from testkit.sidecar import Attempt

PROCESS_LEFT = "process left"
SLOW_CALL = "call slower than backend_timeout"
LOCKED = "volume left locked (given up on)"
FINAL_ERROR = "final error on a valid request"
CROSSED = "crossed answer"
ORPHAN = "orphan"
POOL_SIZE = "pool size"


class Audit:
    """The findings of one test, by check (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._findings: dict[str, list[str]] = {}

    def add(self, check: str, finding: str) -> None:
        with self._lock:
            self._findings.setdefault(check, []).append(finding)

    def failed_checks(self) -> list[str]:
        with self._lock:
            return sorted(self._findings)

    def report(self) -> str:
        with self._lock:
            return "\n".join(
                f"{check} ({len(found)}):\n" + "\n".join(f"  {f}" for f in found[:20])
                for check, found in sorted(self._findings.items())
            )

    # --- checks -------------------------------------------------------------------------------------

    def slow_calls(self, attempts: Iterable[Attempt], bound: float) -> None:
        """Every call answered (OK or not) within ``bound`` seconds: a call that waits out the backend
        timeout is a hung call, whatever it answers in the end."""
        for attempt in attempts:
            if attempt.seconds >= bound:
                self.add(SLOW_CALL, str(attempt))

    def processes_left(self, tree_tag: str, grace: float, whose: str) -> None:
        """No process of the tree tagged ``tree_tag`` (a driver and all it started) is there after
        ``grace`` seconds; those found are killed."""
        for left in processes.survivors(processes.TREE_VAR, tree_tag, grace):
            self.add(PROCESS_LEFT, f"{whose}: {left}")
        processes.kill_tagged(processes.TREE_VAR, tree_tag)

    def orphans(self, database: Path, loopback_dir: Path, workdir: Path) -> None:
        """Nothing left once everything was deleted: no row, no file, no loop device, no mount."""
        for row in live_rows(database):
            self.add(ORPHAN, f"database row {row}")
        for path in sorted(loopback_dir.iterdir()) if loopback_dir.exists() else []:
            self.add(ORPHAN, f"file {path.name} ({path.stat().st_size} bytes)")
        for device in loop.devices_under(workdir):
            self.add(ORPHAN, f"loop device {device}")
        for mount in mounts_under(workdir):
            self.add(ORPHAN, f"mount {mount}")


# Cinder's tables that hold a volume, a snapshot or a publication, with the columns that say which.
LIVE_TABLES = {
    "volumes": "id, display_name, status",
    "snapshots": "id, display_name, volume_id, status",
    "volume_attachment": "volume_id, attached_host, attach_status",
    "volume_metadata": "volume_id, key",
    "volume_admin_metadata": "volume_id, key",
    "snapshot_metadata": "snapshot_id, key",
    "groups": "id, name, status",
    "group_snapshots": "id, name, status",
    "group_volume_type_mapping": "group_id, volume_type_id",
}


def _query(database: Path, sql: str, parameters: tuple[str, ...] = ()) -> list[tuple[object, ...]]:
    """Rows of ``sql`` on the controller's SQLite file, read-only (the controller may be writing)."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as db:
        return db.execute(sql, parameters).fetchall()


def live_rows(database: Path) -> list[str]:
    """The rows of :data:`LIVE_TABLES` not marked deleted, described."""
    found = []
    for table, columns in LIVE_TABLES.items():
        for row in _query(database, f"SELECT {columns} FROM {table} WHERE deleted = 0"):
            found.append(f"{table} {row}")
    return found


def named(database: Path, table: str, resource_id: str) -> tuple[str, str] | None:
    """(display name, volume id) of the live volume or snapshot ``resource_id`` (``table``: ``volumes``
    or ``snapshots``; a volume's volume id is its own), or None when there is none."""
    volume_column = "volume_id" if table == "snapshots" else "id"
    rows = _query(
        database, f"SELECT display_name, {volume_column} FROM {table} WHERE id = ? AND deleted = 0", (resource_id,)
    )
    return (str(rows[0][0]), str(rows[0][1])) if rows else None


def duplicate_names(database: Path) -> list[tuple[str, int]]:
    """(name, how many) of each name that several live volumes, or several live snapshots, carry."""
    found = []
    for table in ("volumes", "snapshots"):
        sql = f"SELECT display_name, COUNT(*) FROM {table} WHERE deleted = 0 GROUP BY display_name HAVING COUNT(*) > 1"
        found += [(str(name), int(str(count))) for name, count in _query(database, sql)]
    return found


def mounts_under(directory: Path) -> list[str]:
    """Mount points, or mounted sources, under ``directory``."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point, source = fields[4], fields[fields.index("-") + 2]
        if any(p == str(directory) or p.startswith(f"{directory}/") for p in (point, source)):
            found.append(f"{source} on {point}")
    return found
