"""Plain, picklable records that cross the socket between the front and the backend workers: views of
volumes and snapshots, what a worker starts with, and the few other arguments and results of
:mod:`operations` that are more than one value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mbs_csi import errors

GIB = 1024**3


@dataclass(frozen=True)
class VolumeRecord:
    id: str
    name: str
    backend: str
    size_gib: int
    status: str
    source_volume_id: str | None = None
    source_snapshot_id: str | None = None
    # CSI facts about the volume, kept in the volume's metadata (see service.META_*)
    metadata: dict[str, str] = field(default_factory=dict)
    # node id -> attach mode ("rw" or "ro")
    published: dict[str, str] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.size_gib * GIB


@dataclass(frozen=True)
class SnapshotRecord:
    id: str
    name: str
    volume_id: str
    size_gib: int
    status: str
    created_at: float  # seconds since the epoch
    group_snapshot_id: str | None = None  # set for a member of a group snapshot

    @property
    def size_bytes(self) -> int:
        return self.size_gib * GIB


@dataclass(frozen=True)
class GroupSnapshotRecord:
    """A group snapshot (cinder's ``group_snapshots`` row) and its member snapshots."""

    id: str
    name: str
    status: str
    created_at: float  # seconds since the epoch
    snapshots: tuple[SnapshotRecord, ...]

    @property
    def source_volume_ids(self) -> frozenset[str]:
        return frozenset(s.volume_id for s in self.snapshots)

    def check_members(self, snapshot_ids: list[str]) -> None:
        """InvalidArgument unless ``snapshot_ids`` are this group snapshot's members (CSI's mismatch rule)."""
        members = {s.id for s in self.snapshots}
        if set(snapshot_ids) != members:
            raise errors.InvalidArgument(
                f"snapshot_ids do not match the members of group snapshot {self.id}: "
                f"unknown {sorted(set(snapshot_ids) - members)}, missing {sorted(members - set(snapshot_ids))}"
            )


@dataclass(frozen=True)
class VolumeCheck:
    """A volume, and whether the storage still has it: ``present`` None when the driver cannot tell."""

    volume: VolumeRecord
    present: bool | None
    message: str


DATABASE_STORE = "database"  # the connector_store whose rows the workers read and write (config.CONNECTOR_STORES)


@dataclass(frozen=True)
class NodeConnector:
    """Where a node's os-brick connector properties are, for a publish: found by the front (``properties``,
    None when the node published none), or, for the ``database`` store, read by the worker itself."""

    store: str  # the connector_store setting
    properties: dict[str, Any] | None = None


@dataclass(frozen=True)
class BackendSpec:
    """What a worker needs to initialise one backend (secrets revealed: it crosses a local socketpair)."""

    name: str
    volume_driver: str
    options: dict[str, object]
    mutable_parameters: tuple[str, ...] = ()  # the keys its volumes' mutable parameters may set


@dataclass(frozen=True)
class WorkerConfig:
    database: str
    state_dir: str
    log_level: str
    backends: tuple[BackendSpec, ...]
    secrets: tuple[str, ...]  # values to scrub from the worker's logs
    backend_timeout: float  # seconds a backend call may run (the worker bounds its database waits by it)
