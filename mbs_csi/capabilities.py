"""Checks shared by the controller and node services: required fields and volume capabilities."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from csi import csi_pb2
from mbs_csi import errors, filesystems

AccessMode = csi_pb2.VolumeCapability.AccessMode

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


# How a volume may be shared between the targets it is published at on one node, by access mode (the
# CSI spec's AccessMode): (targets at most, read-write targets at most), None for no limit.
_SHARING: dict[int, tuple[int | None, int | None]] = {
    AccessMode.SINGLE_NODE_WRITER: (None, 1),  # "published once as read/write"
    AccessMode.SINGLE_NODE_READER_ONLY: (1, None),  # "published once as readonly"
    AccessMode.SINGLE_NODE_SINGLE_WRITER: (1, None),  # "published once as read/write": one workload only
    AccessMode.SINGLE_NODE_MULTI_WRITER: (None, None),
    AccessMode.MULTI_NODE_READER_ONLY: (None, None),
    AccessMode.MULTI_NODE_SINGLE_WRITER: (None, 1),  # "only one node can be used as read/write"
    AccessMode.MULTI_NODE_MULTI_WRITER: (None, None),
}


def mode_name(mode: int) -> str:
    return AccessMode.Mode.Name(mode) if mode in AccessMode.Mode.values() else str(mode)


def sharing_conflict(publishes: list[tuple[int, bool]]) -> str | None:
    """Why a volume cannot be published at all of these targets of one node at once, each given as
    (access mode, read-only), or None when every publish's access mode allows the others."""
    writers = sum(not readonly for _, readonly in publishes)
    for mode in sorted({mode for mode, _ in publishes}):
        most_targets, most_writers = _SHARING.get(mode, (None, None))
        if most_targets is not None and len(publishes) > most_targets:
            return f"{mode_name(mode)} allows {most_targets} publish on a node"
        if most_writers is not None and writers > most_writers:
            return f"{mode_name(mode)} allows {most_writers} read-write publish on a node"
    return None


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
            fs = cap.mount.fs_type or filesystems.DEFAULT
            if fs not in filesystems.FILESYSTEMS:
                raise errors.InvalidArgument(
                    f"fs_type {fs!r} is not supported; use one of {', '.join(filesystems.FILESYSTEMS)}"
                )
            fs_types.add(fs)
        mode = cap.access_mode.mode
        if mode not in AccessMode.Mode.values():
            raise errors.InvalidArgument(f"access_mode.mode {mode} is not an access mode of the CSI spec")
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
