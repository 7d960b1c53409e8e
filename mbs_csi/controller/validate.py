"""Argument checks for controller RPCs: each raises the error the CSI spec names, with a useful message."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from csi import csi_pb2
from mbs_csi import errors
from mbs_csi.config import Backend, Settings
from mbs_csi.controller.records import GIB

DEFAULT_SIZE_GIB = 1
BACKEND_PARAMETER = "backend"
# Keys the external-provisioner adds with --extra-create-metadata; accepted and not used.
K8S_PARAMETER_PREFIX = "csi.storage.k8s.io/"
# The largest volume in GiB: cinder keeps sizes in a 32-bit integer column (PostgreSQL refuses more), and
# in bytes it stays far below what a file offset or a protobuf int64 can hold.
MAX_SIZE_GIB = 2**31 - 1
# The request fields, at any depth, that name or identify a volume, snapshot or node.
IDENTIFIER_FIELDS = frozenset(
    {"name", "volume_id", "snapshot_id", "source_volume_id", "node_id"}
    | {"group_snapshot_id", "source_volume_ids", "snapshot_ids"}
)
# CSI's size limit for strings.
MAX_IDENTIFIER_BYTES = 128


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
    if size > MAX_SIZE_GIB:
        raise errors.OutOfRange(
            f"capacity_range asks for {required} bytes; a volume can be at most {MAX_SIZE_GIB} GiB "
            f"({MAX_SIZE_GIB * GIB} bytes)"
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


def identifiers(request: Message, path: str = "") -> None:
    """Refuse a request whose names or ids (fields in :data:`IDENTIFIER_FIELDS`, nested ones included)
    break CSI's limits: at most 128 bytes, and no NUL byte (which PostgreSQL cannot store)."""
    for field, value in request.ListFields():
        where = f"{path}{field.name}"
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.label != FieldDescriptor.LABEL_REPEATED:
            identifiers(value, f"{where}.")
        elif field.name in IDENTIFIER_FIELDS:
            for item in value if field.label == FieldDescriptor.LABEL_REPEATED else [value]:
                if isinstance(item, str):
                    _identifier(where, item)


def _identifier(where: str, value: str) -> None:
    size = len(value.encode())
    if size > MAX_IDENTIFIER_BYTES:
        raise errors.InvalidArgument(f"{where} is {size} bytes long; CSI allows at most {MAX_IDENTIFIER_BYTES}")
    if "\0" in value:
        raise errors.InvalidArgument(f"{where} contains a NUL byte")
