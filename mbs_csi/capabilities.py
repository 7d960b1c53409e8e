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
