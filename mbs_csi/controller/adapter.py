"""The backend operations a worker runs for the front, on cinderlib.

:class:`Adapter` implements :class:`~mbs_csi.controller.operations.BackendOperations`, each operation
one method (``Adapter.run`` dispatches the front's requests to them). They return plain records
(``records.py``) and raise the driver's own errors; cinder's exceptions are translated by
``failures.py``.

Crash safety: a new volume or snapshot is recorded in the database (status ``creating``) *before* the
driver is asked to make it, and the record is removed again when the driver call fails. If the process
dies in between, the next request for the same name finds the ``creating`` record and deletes whatever
the storage holds under it before trying again: nothing is left on the storage without a record.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import cinderlib
from cinder import exception as cinder_exception
from cinderlib import objects

from mbs_csi import errors, mutable_parameters
from mbs_csi.controller import database, failures, retype, storage_audit
from mbs_csi.controller.attach_limits import NodeSlots
from mbs_csi.controller.backends import Backends, setup_cinderlib
from mbs_csi.controller.cinder_records import snapshot_record, volume_record
from mbs_csi.controller.groups import Groups
from mbs_csi.controller.operations import OPERATIONS, BackendOperations
from mbs_csi.controller.records import (
    CONNECTION_TO_MISSING_NODE,
    DATABASE_STORE,
    GIB,
    NO_LIMITS,
    RECORD_WITHOUT_SNAPSHOT,
    RECORD_WITHOUT_VOLUME,
    TEMPORARY_LEFTOVER,
    AttachLimits,
    AuditReport,
    Finding,
    GroupSnapshotRecord,
    NodeConnector,
    SnapshotRecord,
    VolumeCheck,
    VolumeRecord,
    WorkerConfig,
)
from mbs_csi.controller.rows import Rows
from mbs_csi.controller.stats import summarize_stats

log = logging.getLogger("mbs_csi.adapter")

CONNECTOR_KEY = "connector:{node}"
USABLE = ("available", "in-use")


class Adapter(BackendOperations):
    """The backend operations of one worker process (cinderlib is set up once per process)."""

    def __init__(self, config: WorkerConfig) -> None:
        setup_cinderlib(config)
        self.persistence = cinderlib.Backend.persistence
        engine = database.engine(config.backend_timeout)
        self.rows = Rows(engine, self.persistence)
        self.backends = Backends(config.backends)
        self.groups = Groups(engine, self.rows, self.backends, self._require_volume, self._destroy_snapshot)
        self.accepted = {spec.name: spec.mutable_parameters for spec in config.backends}  # mutable parameters
        self.slots = NodeSlots(self.rows.engine)
        # No call runs longer than backend_timeout (its worker is replaced): a create still recorded as
        # ``creating`` twice that long after it began was interrupted, and nobody retried it.
        self.interrupted_after = datetime.timedelta(seconds=2 * config.backend_timeout)

    @property
    def backend_errors(self) -> dict[str, str | None]:
        """Backend name -> why it failed to initialise, or None: the worker reports it when ready."""
        return self.backends.errors

    def run(self, operation: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the operation the front asked for: one of :data:`~mbs_csi.controller.operations.OPERATIONS`."""
        if operation not in OPERATIONS:
            raise errors.Internal(f"unknown backend operation {operation!r}")
        method: Callable[..., Any] = getattr(self, operation)
        # After a failure, drop the idle connections: whatever failed may have broken them.
        return failures.retrying(operation, partial(method, *args, **kwargs), after_failure=self.drop_idle_connections)

    def drop_idle_connections(self) -> None:
        """Shut down the storage connections kept open between calls (see :mod:`rados_reuse`)."""
        self.backends.drop_idle_connections()

    # --- lookups ------------------------------------------------------------------------------------

    def _require_volume(self, volume_id: str) -> objects.Volume:
        """The volume, if it exists and is usable (a volume being made or deleted is not there yet, or any more)."""
        volume = self.rows.volume(volume_id)
        if volume is None or volume.status not in USABLE:
            raise errors.NotFound(f"volume {volume_id} does not exist")
        return volume

    def get_volume(self, volume_id: str) -> VolumeRecord | None:
        volume = self.rows.volume(volume_id)
        return volume_record(volume) if volume else None

    def list_volumes(self) -> list[VolumeRecord]:
        return [volume_record(v) for v in self.persistence.get_volumes()]

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        snapshot = self.rows.snapshot(snapshot_id)
        return snapshot_record(snapshot) if snapshot else None

    def list_snapshots(self) -> list[SnapshotRecord]:
        return [snapshot_record(s) for s in self.persistence.get_snapshots()]

    def stats(self, backend: str) -> dict[str, Any]:
        return summarize_stats(self.backends.get(backend).stats(refresh=True))

    def check_volume(self, volume_id: str) -> VolumeCheck:
        """Uses the driver's ``manage_existing_get_size`` (Cinder's generic "does this exist, how big"
        call), which most drivers implement."""
        volume = self._require_volume(volume_id)
        record = volume_record(volume)
        try:
            volume.backend.driver.manage_existing_get_size(volume._ovo, {"source-name": volume._ovo.name})
        except NotImplementedError:
            return VolumeCheck(record, None, "the backend driver cannot check for the volume")
        except (cinder_exception.ManageExistingInvalidReference, cinder_exception.NotFound):
            return VolumeCheck(record, False, f"volume {volume_id} is missing on backend {volume.backend.id}")
        except Exception as exc:
            return VolumeCheck(record, False, f"cannot check volume {volume_id} on backend {volume.backend.id}: {exc}")
        return VolumeCheck(record, True, "volume is present on the backend")

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
        leftovers = self.persistence.get_volumes(volume_name=name) if self.rows.ids_named("volumes", name) else []
        for leftover in leftovers:
            if leftover.status in USABLE:
                return volume_record(leftover), False
            log.info(
                "removing leftover volume %s (%s) of an earlier failed create of %s", leftover.id, leftover.status, name
            )
            self._destroy_volume(leftover)

        # Built from the backend, never copied from a source volume: a copy would inherit the source's
        # provider_location, created_at and the like.
        target = self.backends.get(backend)
        fields: dict[str, Any] = {"name": name, "metadata": metadata, "status": "creating"}
        make: Callable[[], Any]
        if source_snapshot_id:
            snapshot = self.rows.snapshot(source_snapshot_id)
            if snapshot is None or snapshot.status != "available":
                raise errors.NotFound(f"source snapshot {source_snapshot_id} does not exist")
            self._check_same_backend(snapshot.backend.id, backend, "snapshot", source_snapshot_id)
            self._check_source_fits(snapshot.volume_size, limit_bytes, "snapshot", source_snapshot_id)
            volume = objects.Volume(target, size=snapshot.volume_size, snapshot_id=snapshot.id, **fields)
            make = partial(target.driver.create_volume_from_snapshot, volume._ovo, snapshot._ovo)
        elif source_volume_id:
            source = self._require_volume(source_volume_id)
            self._check_same_backend(source.backend.id, backend, "volume", source_volume_id)
            self._check_source_fits(source.size, limit_bytes, "volume", source_volume_id)
            volume = objects.Volume(target, size=source.size, source_volid=source.id, **fields)
            make = partial(target.driver.create_cloned_volume, volume._ovo, source._ovo)
        else:
            volume = objects.Volume(target, size=size_gib, **fields)
            make = partial(target.driver.create_volume, volume._ovo)

        volume._ovo.created_at = _utcnow()
        with retype.one_transaction():  # recorded before the storage is touched: see the module docstring
            if mutable:
                retype.give_type(volume, mutable)
            self.rows.insert(volume)
        try:
            self.rows.mark_available(volume, make())
            if volume.size < size_gib:  # a copy is as big as its source: grow it to what was asked
                self._extend(volume, size_gib)
        except Exception:
            self._destroy_volume(volume)
            raise
        return volume_record(volume, published={}), True

    @staticmethod
    def _check_same_backend(source_backend: str, backend: str, kind: str, source_id: str) -> None:
        if source_backend != backend:
            raise errors.InvalidArgument(
                f"source {kind} {source_id} is on backend {source_backend}, not {backend}: a volume can only be "
                "made from a source on its own backend"
            )

    @staticmethod
    def _check_source_fits(source_gib: int, limit_bytes: int, kind: str, source_id: str) -> None:
        if limit_bytes and source_gib * GIB > limit_bytes:
            raise errors.OutOfRange(
                f"cannot make a volume of at most {limit_bytes} bytes from source {kind} {source_id}: the source "
                f"is {source_gib} GiB, and a volume is at least as big as its source"
            )

    @staticmethod
    def _destroy(resource: Any, delete_on_storage: Callable[[Any], Any], forget: Callable[[Any], Any]) -> None:
        """Delete a volume or snapshot from the storage (absent is fine), then forget its record. When the
        storage fails, the record stays, marked ``error_deleting``; when it refuses as busy, nothing was
        deleted and the record stays as it was."""
        try:
            delete_on_storage(resource._ovo)
        except cinder_exception.NotFound:
            pass
        except Exception as exc:
            if not failures.busy(exc):
                resource._ovo.status = "error_deleting"
                resource.save()
            raise
        forget(resource)

    def _destroy_volume(self, volume: objects.Volume) -> None:
        self._destroy(volume, volume.backend.driver.delete_volume, self.rows.forget)

    def delete_volume(self, volume_id: str) -> None:
        snapshot_ids, nodes = self.rows.dependents(volume_id)
        if snapshot_ids:
            ids = ", ".join(sorted(snapshot_ids))
            raise errors.FailedPrecondition(f"volume {volume_id} still has snapshots: {ids}; delete them first")
        if nodes:
            raise errors.FailedPrecondition(
                f"volume {volume_id} is still published to node(s) {', '.join(nodes)}; unpublish it first"
            )
        volume = self.rows.volume(volume_id)
        if volume is not None:
            retype.forget_stale_types(volume_id, volume._ovo.volume_type)
            self._destroy_volume(volume)

    def extend_volume(self, volume_id: str, size_gib: int, limit_bytes: int) -> VolumeRecord:
        volume = self._require_volume(volume_id)
        if limit_bytes and limit_bytes < volume.size * GIB:
            raise errors.OutOfRange(
                f"volume {volume_id} is {volume.size * GIB} bytes; volumes cannot shrink to {limit_bytes}"
            )
        if volume.size < size_gib:
            self._extend(volume, size_gib)
        return volume_record(volume)

    def _extend(self, volume: objects.Volume, size_gib: int) -> None:
        """Grow ``volume`` on the storage, then record its new size.

        Not cinderlib's ``Volume.extend``: that records the volume as ``extending`` while the storage
        works (a volume the front does not serve) and as ``error`` when the storage refuses. Here the
        record keeps its status, and its size until the storage has grown the volume: a refused or
        interrupted expand leaves the volume's record as it was, and the CO's retry asks the storage
        again (as Cinder's volume manager does, the driver gets the volume at its recorded size).
        """
        volume.backend.driver.extend_volume(volume._ovo, size_gib)
        self.rows.resize(volume, size_gib)

    def modify_volume(self, volume_id: str, mutable: dict[str, str]) -> None:
        volume = self._require_volume(volume_id)
        mutable_parameters.check(volume.backend.id, self.accepted.get(volume.backend.id, ()), mutable)
        retype.modify(volume, mutable, self.persistence.DEFAULT_TYPE.id)

    # --- snapshots ----------------------------------------------------------------------------------

    def create_snapshot(self, volume_id: str, name: str) -> SnapshotRecord:
        leftovers = self.persistence.get_snapshots(snapshot_name=name) if self.rows.ids_named("snapshots", name) else []
        for leftover in leftovers:
            if leftover.status == "available":
                return snapshot_record(leftover)
            log.info(
                "removing leftover snapshot %s (%s) of an earlier failed create of %s",
                leftover.id,
                leftover.status,
                name,
            )
            self._destroy_snapshot(leftover)
        volume = self.rows.volume(volume_id)
        if volume is None or volume.status not in USABLE:
            raise errors.NotFound(f"volume {volume_id} does not exist")
        snapshot = objects.Snapshot(volume, name=name, status="creating")
        snapshot._ovo.created_at = _utcnow()
        self.rows.insert(snapshot)
        try:
            self.rows.mark_available(snapshot, volume.backend.driver.create_snapshot(snapshot._ovo))
        except Exception:
            self._destroy_snapshot(snapshot)
            raise
        return snapshot_record(snapshot)

    def _destroy_snapshot(self, snapshot: objects.Snapshot) -> None:
        self._destroy(snapshot, snapshot.backend.driver.delete_snapshot, self.rows.forget)

    def delete_snapshot(self, snapshot_id: str) -> None:
        snapshot = self.rows.snapshot(snapshot_id)
        if snapshot is not None and snapshot._ovo.group_snapshot_id:
            raise errors.FailedPrecondition(
                f"snapshot {snapshot_id} is a member of group snapshot {snapshot._ovo.group_snapshot_id}; delete "
                "the group snapshot"
            )
        if snapshot is not None:
            self._destroy_snapshot(snapshot)

    # --- group snapshots ----------------------------------------------------------------------------

    def create_group_snapshot(self, name: str, volume_ids: list[str], loose: bool) -> GroupSnapshotRecord:
        return self.groups.create(name, volume_ids, loose)

    def get_group_snapshot(self, group_snapshot_id: str) -> GroupSnapshotRecord | None:
        return self.groups.get(group_snapshot_id)

    def delete_group_snapshot(self, group_snapshot_id: str, snapshot_ids: list[str]) -> None:
        self.groups.delete(group_snapshot_id, snapshot_ids)

    # --- publication --------------------------------------------------------------------------------

    def set_connector(self, node_id: str, properties: dict[str, Any]) -> None:
        self.persistence.set_key_value(objects.KeyValue(CONNECTOR_KEY.format(node=node_id), json.dumps(properties)))

    def _stored_connector(self, node_id: str) -> dict[str, Any] | None:
        found = self.persistence.get_key_values(CONNECTOR_KEY.format(node=node_id))
        return json.loads(found[0].value) if found else None

    def publish_volume(
        self,
        volume_id: str,
        node_id: str,
        readonly: bool,
        multi_node: bool,
        connector: NodeConnector,
        limits: AttachLimits = NO_LIMITS,
    ) -> dict[str, Any]:
        volume = self._require_volume(volume_id)
        if multi_node and not summarize_stats(volume.backend.stats())["multiattach"]:  # stats as of start-up
            raise errors.InvalidArgument(
                f"volume {volume_id} is on backend {volume.backend.id}, which does not support multiattach: it "
                "cannot be published with an access mode for several nodes"
            )
        mode = "ro" if readonly else "rw"
        connections = {c.attached_host: c for c in volume.connections}
        if node_id in connections:
            if connections[node_id].attach_mode != mode:
                raise errors.AlreadyExists(
                    f"volume {volume_id} is already published to node {node_id} "
                    f"{'read-only' if mode == 'rw' else 'read-write'}; unpublish it first"
                )
            return connections[node_id].conn_info
        others = sorted(set(connections) - {node_id})
        if others and not multi_node:
            raise errors.FailedPrecondition(
                f"volume {volume_id} is published to node {', '.join(others)} and its access mode allows a single node"
            )
        properties = self._stored_connector(node_id) if connector.store == DATABASE_STORE else connector.properties
        if properties is None:
            raise errors.NotFound(
                f"node {node_id} has not published its connector properties ({connector.store} store); is the "
                "mbs-csi node plugin running there?"
            )
        with self.slots.reserve(node_id, volume.backend.id, limits):
            return volume.connect(properties, attached_host=node_id, attach_mode=mode).conn_info

    def node_gone(self, node_id: str, connector: NodeConnector | None) -> bool:
        """Whether ``node_id`` is known to be gone: its connector properties are no longer in the store
        (``connector`` None: the front could not tell)."""
        if connector is None:
            return False
        if connector.store == DATABASE_STORE:
            return self._stored_connector(node_id) is None
        return connector.properties is None

    def unpublish_volume(self, volume_id: str, node_id: str | None, connector: NodeConnector | None = None) -> None:
        volume = self.rows.volume(volume_id)
        if volume is None:
            return
        mine = [c for c in volume.connections if node_id is None or c.attached_host == node_id]
        force = bool(mine) and node_id is not None and self.node_gone(node_id, connector)
        if force:
            log.warning(
                "node %s is gone (its connector properties are no longer in the %s store): terminating the "
                "connection of volume %s by force",
                node_id,
                connector.store if connector else "",
                volume_id,
            )
        for connection in mine:
            volume.disconnect(connection, force=force)

    # --- audit --------------------------------------------------------------------------------------

    def audit(self, connector_store: str) -> AuditReport:
        return storage_audit.audit(
            self.backends,
            self.persistence,
            self.rows.engine,
            connector_store,
            self._stored_connector,
            self.interrupted_after,
        )

    def fix_findings(self, findings: list[Finding], connector_store: str) -> list[str]:
        """Remove what ``findings`` show provably orphaned, each checked again here first."""
        fixed = []
        for finding in findings:
            if not finding.fixable:
                continue
            if finding.kind == TEMPORARY_LEFTOVER:
                removed: list[str] = getattr(self.backends.get(finding.backend).driver, "remove_leftovers", list)()
                fixed += [f"removed {name}" for name in removed]
            elif finding.kind == CONNECTION_TO_MISSING_NODE:
                connector = NodeConnector(connector_store)  # the front checked the kubernetes store just now
                if self.node_gone(finding.node_id, connector):
                    self.unpublish_volume(finding.volume_id, finding.node_id, connector)
                    fixed.append(f"terminated the connection of volume {finding.volume_id} to node {finding.node_id}")
            elif finding.kind == RECORD_WITHOUT_VOLUME:
                volume = self.rows.volume(finding.name)
                if volume is not None and volume.status in storage_audit.DELETING:
                    self._destroy_volume(volume)
                    fixed.append(f"finished deleting volume {finding.name}")
            elif finding.kind == RECORD_WITHOUT_SNAPSHOT:
                snapshot = self.rows.snapshot(finding.name)
                if snapshot is not None and snapshot.status in storage_audit.DELETING:
                    self._destroy_snapshot(snapshot)
                    fixed.append(f"finished deleting snapshot {finding.name}")
        return sorted(set(fixed))


def _utcnow() -> datetime.datetime:
    """Now, as the naive UTC datetime cinder keeps."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
