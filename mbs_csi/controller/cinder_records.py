"""The plain records (:mod:`records`) of cinderlib's volumes and snapshots, made in the backend workers."""

from __future__ import annotations

import datetime
from typing import Any

from cinderlib import objects

from mbs_csi.controller.records import SnapshotRecord, VolumeRecord


def epoch(ovo: Any) -> float:
    """``created_at`` as seconds since the epoch; cinder keeps naive UTC datetimes."""
    if not ovo.obj_attr_is_set("created_at") or ovo.created_at is None:
        return 0.0
    created = ovo.created_at
    return (created if created.tzinfo else created.replace(tzinfo=datetime.UTC)).timestamp()


def volume_record(volume: objects.Volume, published: dict[str, str] | None = None) -> VolumeRecord:
    """The record of ``volume``; pass ``published`` when known, to skip reading its connections."""
    ovo = volume._ovo
    return VolumeRecord(
        id=volume.id,
        name=ovo.display_name or "",
        backend=volume.backend.id,
        size_gib=ovo.size,
        status=ovo.status,
        source_volume_id=ovo.source_volid,
        source_snapshot_id=ovo.snapshot_id,
        metadata=dict(ovo.metadata or {}),
        published={c.attached_host: c.attach_mode for c in volume.connections} if published is None else published,
    )


def snapshot_record(snapshot: objects.Snapshot) -> SnapshotRecord:
    ovo = snapshot._ovo
    return SnapshotRecord(
        id=snapshot.id,
        name=ovo.display_name or "",
        volume_id=ovo.volume_id,
        size_gib=ovo.volume_size,
        status=ovo.status,
        created_at=epoch(ovo),
        group_snapshot_id=ovo.group_snapshot_id if ovo.obj_attr_is_set("group_snapshot_id") else None,
    )
