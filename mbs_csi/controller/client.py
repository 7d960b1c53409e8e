"""The backend operations as the front calls them: each method one round trip to a worker of the pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from mbs_csi import logs
from mbs_csi.controller.operations import BackendOperations
from mbs_csi.controller.pool import WorkerPool
from mbs_csi.controller.records import (
    NO_LIMITS,
    AttachLimits,
    AuditReport,
    Finding,
    GroupSnapshotRecord,
    NodeConnector,
    SnapshotRecord,
    VolumeCheck,
    VolumeRecord,
)

P = ParamSpec("P")
T = TypeVar("T")


class BackendClient(BackendOperations):
    """:class:`BackendOperations` run in the pool's workers, logged there under the CSI call's request id."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def _call(self, operation: Callable[Concatenate[BackendOperations, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``operation`` (a method of the interface, which types the arguments and the result) in a worker."""
        return self.pool.call(operation.__name__, args, kwargs, request_id=logs.request_id.get())

    def stats(self, backend: str) -> dict[str, Any]:
        return self._call(BackendOperations.stats, backend)

    def get_volume(self, volume_id: str) -> VolumeRecord | None:
        return self._call(BackendOperations.get_volume, volume_id)

    def list_volumes(self) -> list[VolumeRecord]:
        return self._call(BackendOperations.list_volumes)

    def check_volume(self, volume_id: str) -> VolumeCheck:
        return self._call(BackendOperations.check_volume, volume_id)

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        return self._call(BackendOperations.get_snapshot, snapshot_id)

    def list_snapshots(self) -> list[SnapshotRecord]:
        return self._call(BackendOperations.list_snapshots)

    def create_volume(
        self,
        backend: str,
        name: str,
        size_gib: int,
        limit_bytes: int,
        metadata: dict[str, str],
        source_volume_id: str | None = None,
        source_snapshot_id: str | None = None,
        mutable: dict[str, str] | None = None,
    ) -> tuple[VolumeRecord, bool]:
        return self._call(
            BackendOperations.create_volume,
            backend,
            name,
            size_gib,
            limit_bytes,
            metadata,
            source_volume_id,
            source_snapshot_id,
            mutable,
        )

    def delete_volume(self, volume_id: str) -> None:
        return self._call(BackendOperations.delete_volume, volume_id)

    def extend_volume(self, volume_id: str, size_gib: int, limit_bytes: int) -> VolumeRecord:
        return self._call(BackendOperations.extend_volume, volume_id, size_gib, limit_bytes)

    def modify_volume(self, volume_id: str, mutable: dict[str, str]) -> None:
        return self._call(BackendOperations.modify_volume, volume_id, mutable)

    def create_snapshot(self, volume_id: str, name: str) -> SnapshotRecord:
        return self._call(BackendOperations.create_snapshot, volume_id, name)

    def delete_snapshot(self, snapshot_id: str) -> None:
        return self._call(BackendOperations.delete_snapshot, snapshot_id)

    def set_connector(self, node_id: str, properties: dict[str, Any]) -> None:
        return self._call(BackendOperations.set_connector, node_id, properties)

    def publish_volume(
        self,
        volume_id: str,
        node_id: str,
        readonly: bool,
        multi_node: bool,
        connector: NodeConnector,
        limits: AttachLimits = NO_LIMITS,
    ) -> dict[str, Any]:
        return self._call(BackendOperations.publish_volume, volume_id, node_id, readonly, multi_node, connector, limits)

    def unpublish_volume(self, volume_id: str, node_id: str | None, connector: NodeConnector | None = None) -> None:
        return self._call(BackendOperations.unpublish_volume, volume_id, node_id, connector)

    def audit(self, connector_store: str) -> AuditReport:
        return self._call(BackendOperations.audit, connector_store)

    def fix_findings(self, findings: list[Finding], connector_store: str) -> list[str]:
        return self._call(BackendOperations.fix_findings, findings, connector_store)

    def create_group_snapshot(self, name: str, volume_ids: list[str], loose: bool) -> GroupSnapshotRecord:
        return self._call(BackendOperations.create_group_snapshot, name, volume_ids, loose)

    def get_group_snapshot(self, group_snapshot_id: str) -> GroupSnapshotRecord | None:
        return self._call(BackendOperations.get_group_snapshot, group_snapshot_id)

    def delete_group_snapshot(self, group_snapshot_id: str, snapshot_ids: list[str]) -> None:
        return self._call(BackendOperations.delete_group_snapshot, group_snapshot_id, snapshot_ids)
