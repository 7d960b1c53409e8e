"""Stand-in for a Cinder driver with group snapshots of its own (array drivers have them; none of the drivers
that run here does): the loopback driver, plus Cinder's group calls and the capability
``consistent_group_snapshot_enabled``, for tests/test_group_snapshots.py to check that the controller uses a
driver's own group calls, and lets a strict VolumeGroupSnapshotClass through, on such a backend.

Its group snapshots are the loopback's copies taken one after the other: consistent in name only. Each group
call is appended to ``group-calls.jsonl`` beside ``loopback_dir`` for the test to read.
"""

from __future__ import annotations

import json
from typing import Any

from mbs_csi.drivers.loopback import LoopbackDriver

JOURNAL = "group-calls.jsonl"


class GroupLoopbackDriver(LoopbackDriver):
    def _journal(self, call: str, **details: Any) -> None:
        with (self.loopback_dir.parent / JOURNAL).open("a") as journal:
            journal.write(json.dumps({"call": call, **details}) + "\n")

    def _update_volume_stats(self) -> None:
        super()._update_volume_stats()
        for pool in self._stats["pools"]:
            pool["consistent_group_snapshot_enabled"] = True

    def create_group(self, context: Any, group: Any) -> dict[str, Any]:
        self._journal("create_group", group=group.id)
        return {"status": "available"}

    def update_group(
        self, context: Any, group: Any, add_volumes: Any = None, remove_volumes: Any = None
    ) -> tuple[None, None, None]:
        self._journal("update_group", group=group.id, add=sorted(v.id for v in add_volumes or []))
        return None, None, None

    def create_group_snapshot(self, context: Any, group_snapshot: Any, snapshots: Any) -> tuple[Any, Any]:
        self._journal("create_group_snapshot", group_snapshot=group_snapshot.id, snapshots=len(snapshots))
        for snapshot in snapshots:
            self.create_snapshot(snapshot)
        return {"status": "available"}, [{"id": s.id, "status": "available"} for s in snapshots]

    def delete_group_snapshot(self, context: Any, group_snapshot: Any, snapshots: Any) -> tuple[Any, Any]:
        self._journal("delete_group_snapshot", group_snapshot=group_snapshot.id, snapshots=len(snapshots))
        for snapshot in snapshots:
            self.delete_snapshot(snapshot)
        return {"status": "deleted"}, [{"id": s.id, "status": "deleted"} for s in snapshots]

    def delete_group(self, context: Any, group: Any, volumes: Any) -> tuple[Any, Any]:
        self._journal("delete_group", group=group.id, volumes=len(volumes))
        return {"status": "deleted"}, []
