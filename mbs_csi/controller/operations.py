"""The backend operations: the one typed interface between the gRPC front and the backend workers.

:class:`BackendOperations` lists every operation with its arguments and result. A worker implements it
on cinderlib (:class:`mbs_csi.controller.adapter.Adapter`); the front calls it through
:class:`mbs_csi.controller.client.BackendClient`, each call one round trip to a worker. Each operation
does all that needs the loaded volume or snapshot itself (a source's size, who the volume is published
to), so that no CSI call needs a second trip. Every operation is idempotent (see ``adapter.py``) and
fails with :class:`mbs_csi.errors.CSIError` subclasses, which reach the front as they are.
"""

from __future__ import annotations

from typing import Any, Protocol

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


class BackendOperations(Protocol):
    # --- reads --------------------------------------------------------------------------------------

    def stats(self, backend: str) -> dict[str, Any]:
        """The backend's stats, fresh from the storage, reduced by :func:`stats.summarize_stats`."""

    def get_volume(self, volume_id: str) -> VolumeRecord | None: ...

    def list_volumes(self) -> list[VolumeRecord]: ...

    def check_volume(self, volume_id: str) -> VolumeCheck:
        """The volume, and whether the storage still has it; NotFound when it does not exist."""

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None: ...

    def list_snapshots(self) -> list[SnapshotRecord]: ...

    # --- volumes ------------------------------------------------------------------------------------

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
        """Create (or finish creating) the volume called ``name``, of ``size_gib`` or its source's size if
        larger (OutOfRange when that exceeds ``limit_bytes``, 0: no limit), with the ``mutable`` parameters
        (checked by the front) in its volume type: (its record, True); or (the record of an existing usable
        volume of that name, False), for the front to compare with the request."""

    def delete_volume(self, volume_id: str) -> None: ...

    def extend_volume(self, volume_id: str, size_gib: int, limit_bytes: int) -> VolumeRecord:
        """Grow the volume to ``size_gib`` unless it is that big already; OutOfRange when it is bigger
        than ``limit_bytes`` (0: no limit), since volumes never shrink."""

    def modify_volume(self, volume_id: str, mutable: dict[str, str]) -> None:
        """Set the ``mutable`` parameters on the volume (keys not named stay as they are) through its driver's
        retype; InvalidArgument naming a key its backend does not accept, or when the driver refuses (the
        volume unchanged); nothing to do when the volume has them already."""

    # --- snapshots ----------------------------------------------------------------------------------

    def create_snapshot(self, volume_id: str, name: str) -> SnapshotRecord:
        """Create (or finish creating) the snapshot called ``name``; an available snapshot of that name
        is returned as it is, whatever its volume, for the front to compare with the request."""

    def delete_snapshot(self, snapshot_id: str) -> None: ...

    # --- publication --------------------------------------------------------------------------------

    def set_connector(self, node_id: str, properties: dict[str, Any]) -> None:
        """Store a node's connector properties (``connector_store: database``)."""

    def publish_volume(
        self,
        volume_id: str,
        node_id: str,
        readonly: bool,
        multi_node: bool,
        connector: NodeConnector,
        limits: AttachLimits = NO_LIMITS,
    ) -> dict[str, Any]:
        """The connection info of the volume for ``node_id``: the existing connection when there is one
        (AlreadyExists when its mode differs), a new one otherwise, unless the volume is published to
        another node and ``multi_node`` is false (FailedPrecondition), or the node already has as many
        volumes published as ``limits`` allow (ResourceExhausted)."""

    def unpublish_volume(self, volume_id: str, node_id: str | None, connector: NodeConnector | None = None) -> None:
        """Disconnect the volume from ``node_id`` (from every node when None); a missing volume is fine. When
        ``connector`` shows the node gone (no connector properties in the store any more), the storage is
        told to terminate the connection by force, so that it revokes the dead node's access."""

    # --- audit --------------------------------------------------------------------------------------

    def audit(self, connector_store: str) -> AuditReport:
        """Compare the storage of every backend with the database (see ``storage_audit.py``)."""

    def fix_findings(self, findings: list[Finding], connector_store: str) -> list[str]:
        """Remove what the fixable ``findings`` name, each checked again first; what was done."""

    # --- group snapshots (groups.py) ----------------------------------------------------------------

    def create_group_snapshot(self, name: str, volume_ids: list[str], loose: bool) -> GroupSnapshotRecord:
        """Create (or finish creating) the group snapshot called ``name`` of ``volume_ids`` (all on one
        backend), a member snapshot per volume; FailedPrecondition when the backend cannot take them at
        one point in time, unless ``loose``. An available group snapshot of that name is returned as it
        is, for the front to compare with the request."""

    def get_group_snapshot(self, group_snapshot_id: str) -> GroupSnapshotRecord | None: ...

    def delete_group_snapshot(self, group_snapshot_id: str, snapshot_ids: list[str]) -> None:
        """Delete the group snapshot and its member snapshots; a missing one is fine. InvalidArgument when
        ``snapshot_ids`` are not its members."""


# The operations a worker runs for the front: the public methods of the interface, and nothing else.
OPERATIONS = frozenset(name for name in vars(BackendOperations) if not name.startswith("_"))
