"""CSI messages made from the controller's records, shared by the Controller and GroupController services."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from csi import csi_pb2
from mbs_csi.controller.records import GroupSnapshotRecord, SnapshotRecord


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def csi_snapshot(record: SnapshotRecord) -> csi_pb2.Snapshot:
    return csi_pb2.Snapshot(
        size_bytes=record.size_bytes,
        snapshot_id=record.id,
        source_volume_id=record.volume_id,
        creation_time=timestamp(record.created_at),
        ready_to_use=record.status == "available",
        group_snapshot_id=record.group_snapshot_id or "",
    )


def csi_group_snapshot(record: GroupSnapshotRecord) -> csi_pb2.VolumeGroupSnapshot:
    snapshots = [csi_snapshot(s) for s in record.snapshots]
    return csi_pb2.VolumeGroupSnapshot(
        group_snapshot_id=record.id,
        snapshots=snapshots,
        creation_time=timestamp(record.created_at),
        ready_to_use=record.status == "available" and all(s.ready_to_use for s in snapshots),
    )
