"""Plain, picklable views of volumes and snapshots, passed from the backend workers to the front."""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024**3


@dataclass(frozen=True)
class VolumeRecord:
    id: str
    name: str
    backend: str
    size_gib: int
    status: str
    created_at: float  # seconds since the epoch
    source_volume_id: str | None = None
    source_snapshot_id: str | None = None
    # CSI facts about the volume, kept in the volume's metadata (see service.META_*)
    metadata: dict[str, str] = field(default_factory=dict)
    # node id -> attach mode ("rw" or "ro")
    published: dict[str, str] = field(default_factory=dict)
    snapshot_ids: tuple[str, ...] = ()

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
    created_at: float

    @property
    def size_bytes(self) -> int:
        return self.size_gib * GIB


@dataclass(frozen=True)
class BackendSpec:
    """What a worker needs to initialise one backend (secrets revealed: it crosses a local socketpair)."""

    name: str
    volume_driver: str
    options: dict[str, object]


@dataclass(frozen=True)
class WorkerConfig:
    database: str
    state_dir: str
    log_level: str
    backends: tuple[BackendSpec, ...]
    secrets: tuple[str, ...]  # values to scrub from the worker's logs
    backend_timeout: float  # seconds a backend call may run (the worker bounds its database waits by it)
