"""The node's local attachment store: which volumes are staged here, and how to detach them.

Like Vdsm's managed volume DB: one SQLite file on the node's host path (``<state_dir>/attachments.sqlite``),
one row per staged volume with the connection info, os-brick's device info, the staging path and the
filesystem. NodeStageVolume writes the row *before* attaching, as an intent (state ``attaching``), and
completes it once the volume is mounted (``staged``): a node that stops in between finds the record
and finishes or undoes the stage, never a device attached with no record. NodeUnstageVolume reads the
row to call ``disconnect_volume`` and then removes it; ``mbs-csi node attachments`` lists the rows.

A second table holds the *publications*: each target path the driver published a volume at, with the
access mode and read-only flag it was published with. NodePublishVolume writes it before mounting and
NodeUnpublishVolume removes it after unmounting: the node unmounts or removes only paths recorded
here, never whatever path a request names.

A third holds what the node plugin found and fixed the last time it started (:class:`LastStart`), for
``mbs-csi node attachments`` to show.

**No secrets on disk.** Connection info may hold a CHAP password or a Ceph keyring (merged in from the
node-stage secrets). Every entry the driver's one rule calls secret (:func:`mbs_csi.secrets.is_secret`:
anything from the secrets map, a secret-looking key, a value holding a registered secret; at any
depth) is dropped before a row is written, in ``connection_info`` and ``device_info`` alike; what
:meth:`AttachmentStore.get` returns is that secret-free copy. ``disconnect_volume`` does not need the
secrets (an iSCSI logout or a krbd unmap needs no password), which is as well: CSI's NodeUnstageVolume
carries no secrets to fill them back from.

Standard library only (``sqlite3``): the node role must start fast. One connection per store guarded by
a lock serves the gRPC server's threads; WAL journaling lets another process (the CLI) read while the
server writes. A record is durable when :meth:`~AttachmentStore.put` returns (``synchronous=FULL``: the
WAL is flushed at commit). A removal is not flushed by itself (``synchronous=NORMAL`` for that commit):
it becomes durable with the next put or checkpoint, and if the host loses power before, the record is
merely back, for a volume no longer staged, which every node call treats as it should (an unstage
of it unmounts nothing and detaches nothing left). Losing a put could leave a device attached with no
record of it; losing a removal cannot. ``PRAGMA user_version`` holds the schema version.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mbs_csi import secrets

FILENAME = "attachments.sqlite"
ACCESS_TYPES = ("mount", "block")
# An attachment is "attaching" from before os-brick attaches until the volume is mounted (or, for
# block, verified): a record left in that state is a stage that stopped halfway, to finish or undo.
ATTACHING, STAGED = "attaching", "staged"
BUSY_TIMEOUT = 30.0  # seconds to wait for another process's write lock

# _MIGRATIONS[n] takes the schema from version n to n + 1; SCHEMA_VERSION is where they lead.
_MIGRATIONS: list[list[str]] = [
    [
        """
        CREATE TABLE attachments (
            volume_id       TEXT PRIMARY KEY,
            staging_path    TEXT NOT NULL,
            access_type     TEXT NOT NULL CHECK (access_type IN ('mount', 'block')),
            fs_type         TEXT NOT NULL DEFAULT '',
            connection_info TEXT NOT NULL DEFAULT '{}',
            device_info     TEXT NOT NULL DEFAULT '{}',
            device_path     TEXT NOT NULL DEFAULT '',
            created_at      REAL NOT NULL,
            extra           TEXT NOT NULL DEFAULT '{}'
        )
        """,
    ],
    [
        """
        CREATE TABLE publications (
            target_path  TEXT PRIMARY KEY,
            volume_id    TEXT NOT NULL,
            access_mode  INTEGER NOT NULL,
            readonly     INTEGER NOT NULL CHECK (readonly IN (0, 1)),
            created_at   REAL NOT NULL
        )
        """,
        "CREATE INDEX publications_by_volume ON publications (volume_id)",
    ],
    ["ALTER TABLE attachments ADD COLUMN state TEXT NOT NULL DEFAULT 'staged'"],
    [
        """
        CREATE TABLE last_start (
            id     INTEGER PRIMARY KEY CHECK (id = 1),
            at     REAL NOT NULL,
            fixes  TEXT NOT NULL
        )
        """,
    ],
]
SCHEMA_VERSION = len(_MIGRATIONS)
# Schema version 1 has an ``extra`` column that nothing reads or writes any more: a new row gets its
# default, ``'{}'``. It stays, so files written before and after need no migration and read the same.

_COLUMNS = (
    "volume_id",
    "staging_path",
    "access_type",
    "fs_type",
    "connection_info",
    "device_info",
    "device_path",
    "created_at",
    "state",
)
_JSON_COLUMNS = ("connection_info", "device_info")


class StoreError(Exception):
    """The store file cannot be used (written by a newer version, corrupt, unreadable)."""


@dataclass
class Attachment:
    """One staged volume (or one being staged: ``state`` ATTACHING). ``created_at`` is seconds since the epoch."""

    volume_id: str
    staging_path: str
    access_type: str  # "mount" or "block"
    fs_type: str = ""
    connection_info: dict[str, Any] = field(default_factory=dict)
    device_info: dict[str, Any] = field(default_factory=dict)
    device_path: str = ""
    created_at: float = field(default_factory=time.time)
    state: str = STAGED

    def __post_init__(self) -> None:
        self.fs_type = self.fs_type or ""
        self.device_path = self.device_path or ""
        if not self.volume_id:
            raise ValueError("an attachment needs a volume id")
        if self.access_type not in ACCESS_TYPES:
            raise ValueError(f"access_type must be one of {ACCESS_TYPES}, not {self.access_type!r}")
        if self.state not in (ATTACHING, STAGED):
            raise ValueError(f"state must be {ATTACHING!r} or {STAGED!r}, not {self.state!r}")


@dataclass(frozen=True)
class Publication:
    """One target path a volume is published at: its CSI access mode (an ``AccessMode.Mode`` number) and
    whether the publish was read-only."""

    target_path: str
    volume_id: str
    access_mode: int
    readonly: bool
    created_at: float = field(default_factory=time.time)


_PUBLICATION_COLUMNS = ("target_path", "volume_id", "access_mode", "readonly", "created_at")


@dataclass(frozen=True)
class LastStart:
    """When the node plugin last started (seconds since the epoch), and what it found and fixed then."""

    at: float
    fixes: tuple[str, ...]


def without_secrets(value: Any) -> Any:
    """``value`` minus every entry, at any depth, that :func:`mbs_csi.secrets.is_secret` calls secret."""
    if isinstance(value, Mapping):
        return {key: without_secrets(item) for key, item in value.items() if not secrets.is_secret(str(key), item)}
    if isinstance(value, list | tuple):
        return [without_secrets(item) for item in value if not secrets.is_secret("", item)]
    return value


class AttachmentStore:
    """The attachment records of this node, in the SQLite file at ``path`` (created with its schema)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        # Owner-only from the start: SQLite gives its -wal and -shm files the database file's mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        try:
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"attachment store {self.path}: {exc}") from exc

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str]) -> AttachmentStore:
        return cls(os.path.join(os.fspath(state_dir), FILENAME))

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"attachment store {self.path} has schema version {version}, written by a newer mbs-csi; "
                    f"this one knows up to {SCHEMA_VERSION}: run the newer node plugin"
                )
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    db.execute(statement)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self, flush: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction; ``flush=False`` commits without waiting for the disk (see the module doc)."""
        with self._lock:
            if not flush:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not flush:
                    self._db.execute("PRAGMA synchronous=FULL")

    def get(self, volume_id: str) -> Attachment | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM attachments WHERE volume_id = ?", (volume_id,)
            ).fetchone()
        return _from_row(row) if row is not None else None

    def put(self, attachment: Attachment) -> None:
        """Insert the record, or replace the one of the same volume; secret-looking entries are dropped."""
        values = {name: getattr(attachment, name) for name in _COLUMNS}
        for name in _JSON_COLUMNS:
            values[name] = json.dumps(without_secrets(values[name]), sort_keys=True)
        with self._transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO attachments ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                tuple(values[name] for name in _COLUMNS),
            )

    def remove(self, volume_id: str) -> bool:
        """Forget the volume's record; False if there was none."""
        with self._transaction(flush=False) as db:
            return db.execute("DELETE FROM attachments WHERE volume_id = ?", (volume_id,)).rowcount > 0

    def all(self) -> list[Attachment]:
        """Every record, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM attachments ORDER BY created_at, volume_id"
            ).fetchall()
        return [_from_row(row) for row in rows]

    def add_publication(self, publication: Publication) -> None:
        """Record a target path (before mounting on it); replaces a record of the same path."""
        values = tuple(getattr(publication, name) for name in _PUBLICATION_COLUMNS)
        with self._transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO publications ({', '.join(_PUBLICATION_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_PUBLICATION_COLUMNS))})",
                values,
            )

    def publication(self, target_path: str) -> Publication | None:
        """The record of ``target_path``, or None when the driver did not publish anything there."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_PUBLICATION_COLUMNS)} FROM publications WHERE target_path = ?", (target_path,)
            ).fetchone()
        return _publication(row) if row is not None else None

    def publications(self, volume_id: str) -> list[Publication]:
        """Every target path ``volume_id`` is published at, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_PUBLICATION_COLUMNS)} FROM publications WHERE volume_id = ? "
                "ORDER BY created_at, target_path",
                (volume_id,),
            ).fetchall()
        return [_publication(row) for row in rows]

    def remove_publication(self, target_path: str) -> bool:
        """Forget a target path (after unmounting it); False if it was not recorded. Not flushed, as
        :meth:`remove`: a record back after a power loss names a target that is not mounted, which
        NodeUnpublishVolume undoes at once."""
        with self._transaction(flush=False) as db:
            return db.execute("DELETE FROM publications WHERE target_path = ?", (target_path,)).rowcount > 0

    def set_last_start(self, start: LastStart) -> None:
        """Keep what this start found, in place of the previous start's."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO last_start (id, at, fixes) VALUES (1, ?, ?)",
                (start.at, json.dumps(list(start.fixes))),
            )

    def last_start(self) -> LastStart | None:
        """What the node plugin found at its last start; None if it never started with this store."""
        with self._lock:
            row = self._db.execute("SELECT at, fixes FROM last_start WHERE id = 1").fetchone()
        return LastStart(row[0], tuple(json.loads(row[1]))) if row is not None else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> AttachmentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _from_row(row: tuple[Any, ...]) -> Attachment:
    values = dict(zip(_COLUMNS, row, strict=True))
    for name in _JSON_COLUMNS:
        values[name] = json.loads(values[name])
    return Attachment(**values)


def _publication(row: tuple[Any, ...]) -> Publication:
    values = dict(zip(_PUBLICATION_COLUMNS, row, strict=True))
    return Publication(**{**values, "readonly": bool(values["readonly"])})
