"""Builders for CSI requests used across the controller and node tests."""

from __future__ import annotations

from typing import Any

from csi import csi_pb2 as pb

GIB = 1024**3
Mode = pb.VolumeCapability.AccessMode


def mount_cap(fs_type: str = "ext4", mode: Mode.Mode = Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type), access_mode=pb.VolumeCapability.AccessMode(mode=mode)
    )


def block_cap(mode: Mode.Mode = Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(), access_mode=pb.VolumeCapability.AccessMode(mode=mode)
    )


def create_request(
    name: str,
    required: int = 0,
    limit: int = 0,
    caps: list[pb.VolumeCapability] | None = None,
    snapshot: str = "",
    volume: str = "",
    **fields: Any,
) -> pb.CreateVolumeRequest:
    request = pb.CreateVolumeRequest(name=name, volume_capabilities=caps or [mount_cap()], **fields)
    if required or limit:
        request.capacity_range.CopyFrom(pb.CapacityRange(required_bytes=required, limit_bytes=limit))
    if snapshot:
        request.volume_content_source.snapshot.snapshot_id = snapshot
    if volume:
        request.volume_content_source.volume.volume_id = volume
    return request
