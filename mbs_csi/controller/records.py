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


@dataclass(frozen=True)
class AttachLimits:
    """How many volumes one node may have published (``max_volumes_per_node``): in all (``per_node``) and
    of each backend (``per_backend``); 0 or absent: no limit."""

    per_node: int = 0
    per_backend: dict[str, int] = field(default_factory=dict)

    def limited(self, backend: str) -> bool:
        return bool(self.per_node or self.per_backend.get(backend))


NO_LIMITS = AttachLimits()


# The kinds of audit finding (``mbs-csi controller audit``, metric ``mbs_csi_audit_findings{kind}``).
VOLUME_WITHOUT_RECORD = "volume_without_record"  # on the storage, named like ours, no row
SNAPSHOT_WITHOUT_RECORD = "snapshot_without_record"
RECORD_WITHOUT_VOLUME = "record_without_volume"  # a row whose volume the storage does not have
RECORD_WITHOUT_SNAPSHOT = "record_without_snapshot"
CONNECTION_TO_MISSING_NODE = "connection_to_missing_node"  # published to a node whose connector is gone
TEMPORARY_LEFTOVER = "temporary_leftover"  # a crashed create's temp file (loopback's ``.tmp-*``)
INTERRUPTED_CREATE = "interrupted_create"  # a row ``creating`` for longer than any call may take
FINDING_KINDS = (
    VOLUME_WITHOUT_RECORD,
    SNAPSHOT_WITHOUT_RECORD,
    RECORD_WITHOUT_VOLUME,
    RECORD_WITHOUT_SNAPSHOT,
    CONNECTION_TO_MISSING_NODE,
    TEMPORARY_LEFTOVER,
    INTERRUPTED_CREATE,
)


@dataclass(frozen=True)
class Finding:
    kind: str  # one of FINDING_KINDS
    backend: str
    name: str  # the storage name, or the id of the record
    detail: str
    fixable: bool = False  # provably orphaned: ``--fix`` removes it
    volume_id: str = ""
    node_id: str = ""


@dataclass(frozen=True)
class AuditReport:
    """What one audit found; ``publications`` (volume id, node id, backend) for the front to check against the
    Kubernetes connector store (the worker checks the database store itself); ``skipped``: checks that
    could not run, and why."""

    findings: tuple[Finding, ...] = ()
    publications: tuple[tuple[str, str, str], ...] = ()
    skipped: tuple[str, ...] = ()
