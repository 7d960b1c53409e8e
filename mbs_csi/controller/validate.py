"""Argument checks for controller RPCs: each raises the error the CSI spec names, with a useful message."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from csi import csi_pb2
from mbs_csi import errors
from mbs_csi.config import Backend, Settings
from mbs_csi.controller.records import GIB

AccessMode = csi_pb2.VolumeCapability.AccessMode
SUPPORTED_FS = ("ext4", "xfs", "btrfs")
DEFAULT_FS = "ext4"
DEFAULT_SIZE_GIB = 1
BACKEND_PARAMETER = "backend"
# Keys the external-provisioner adds with --extra-create-metadata; accepted and not used.
K8S_PARAMETER_PREFIX = "csi.storage.k8s.io/"

SINGLE_NODE_MODES = frozenset(
    {
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }
)
MULTI_NODE_MODES = frozenset(
    {
        AccessMode.MULTI_NODE_READER_ONLY,
        AccessMode.MULTI_NODE_SINGLE_WRITER,
        AccessMode.MULTI_NODE_MULTI_WRITER,
    }
)


def require(value: object, what: str) -> None:
    if not value:
        raise errors.InvalidArgument(f"{what} is required")


@dataclass(frozen=True)
class Access:
    """What a set of volume capabilities asks for."""

    type: str  # "mount" or "block"
    fs_type: str  # "" for block
    multi_node: bool


def access(capabilities: Iterable[csi_pb2.VolumeCapability], multiattach: bool) -> Access:
    """Check capabilities against what this driver and backend can honour."""
    caps = list(capabilities)
    if not caps:
        raise errors.InvalidArgument("volume_capabilities is required")
    types, fs_types, multi = set(), set(), False
    for cap in caps:
        kind = cap.WhichOneof("access_type")
        if kind is None:
            raise errors.InvalidArgument("each volume capability needs an access type: mount or block")
        types.add(kind)
        if kind == "mount":
            fs = cap.mount.fs_type or DEFAULT_FS
            if fs not in SUPPORTED_FS:
                raise errors.InvalidArgument(f"fs_type {fs!r} is not supported; use one of {', '.join(SUPPORTED_FS)}")
            fs_types.add(fs)
        mode = cap.access_mode.mode
        if mode in MULTI_NODE_MODES:
            multi = True
            if kind != "block":
                raise errors.InvalidArgument(
                    f"access mode {AccessMode.Mode.Name(mode)} needs a block volume: a filesystem mounted on "
                    "several nodes at once would be corrupted"
                )
            if not multiattach:
                raise errors.InvalidArgument(
                    f"access mode {AccessMode.Mode.Name(mode)} needs a backend that supports multiattach; "
                    "this one does not"
                )
        elif mode not in SINGLE_NODE_MODES:
            raise errors.InvalidArgument(f"access mode {AccessMode.Mode.Name(mode)} is not supported")
    if len(types) > 1 or len(fs_types) > 1:
        raise errors.InvalidArgument("volume capabilities must agree on one access type and one fs_type")
    kind = types.pop()
    return Access(type=kind, fs_type=fs_types.pop() if fs_types else "", multi_node=multi)


def backend_for(settings: Settings, parameters: Mapping[str, str]) -> Backend:
    """The backend a request's parameters select (the default one when they name none)."""
    unknown = sorted(k for k in parameters if k != BACKEND_PARAMETER and not k.startswith(K8S_PARAMETER_PREFIX))
    if unknown:
        raise errors.InvalidArgument(
            f"unknown parameter(s) {', '.join(unknown)}; accepted: {BACKEND_PARAMETER}, {K8S_PARAMETER_PREFIX}*"
        )
    name = parameters.get(BACKEND_PARAMETER)
    backend = settings.backend(name)
    if backend is None:
        known = ", ".join(b.name for b in settings.backends)
        raise errors.InvalidArgument(f"unknown backend {name!r}; configured backends: {known}")
    return backend


def size_gib(capacity: csi_pb2.CapacityRange | None, minimum_gib: int = DEFAULT_SIZE_GIB) -> int:
    """Whole GiB satisfying ``capacity`` and at least ``minimum_gib`` (a source's size)."""
    required = capacity.required_bytes if capacity else 0
    limit = capacity.limit_bytes if capacity else 0
    if required < 0 or limit < 0:
        raise errors.InvalidArgument("capacity_range bytes cannot be negative")
    if limit and required > limit:
        raise errors.InvalidArgument(f"capacity_range required_bytes {required} exceeds limit_bytes {limit}")
    size = max(-(-required // GIB), minimum_gib)
    if limit and size * GIB > limit:
        raise errors.OutOfRange(
            f"cannot make a volume of at least {max(required, minimum_gib * GIB)} bytes and at most {limit}: "
            "volumes are allocated in whole GiB"
            + (f" and the source is {minimum_gib} GiB" if minimum_gib > DEFAULT_SIZE_GIB else "")
        )
    return size


def fits(size_bytes: int, capacity: csi_pb2.CapacityRange | None) -> bool:
    """Whether an existing volume of ``size_bytes`` satisfies ``capacity``."""
    if capacity is None:
        return True
    return size_bytes >= capacity.required_bytes and (not capacity.limit_bytes or size_bytes <= capacity.limit_bytes)


def reachable_from(backend: Backend, topologies: Iterable[csi_pb2.Topology]) -> bool:
    """Whether the backend's volumes can be reached from at least one of ``topologies``.

    A backend without topology is reachable from everywhere. A topology reaches the backend when it
    agrees with every segment the backend declares.
    """
    wanted = list(topologies)
    if not backend.topology or not wanted:
        return True
    return any(all(t.segments.get(k) == v for k, v in backend.topology.items()) for t in wanted)


def accessible_topology(backend: Backend, requirements: csi_pb2.TopologyRequirement | None) -> list[csi_pb2.Topology]:
    if requirements is not None and not reachable_from(backend, requirements.requisite):
        raise errors.ResourceExhausted(
            f"backend {backend.name} is reachable only from {dict(backend.topology)}, which no requisite "
            "topology of the request allows"
        )
    return [csi_pb2.Topology(segments=dict(backend.topology))] if backend.topology else []
