"""The backend operations a worker runs for the front, on cinderlib.

Each public ``op_*`` method is one operation the front can ask for (``Adapter.run``). They return plain
records (``records.py``) and raise the driver's own errors; cinder's exceptions are translated by
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

from mbs_csi import errors
from mbs_csi.controller import database, failures
from mbs_csi.controller.backends import Backends, setup_cinderlib
from mbs_csi.controller.cinder_records import snapshot_record, volume_record
from mbs_csi.controller.records import SnapshotRecord, VolumeRecord, WorkerConfig
from mbs_csi.controller.rows import Rows
from mbs_csi.controller.stats import summarize_stats

log = logging.getLogger("mbs_csi.adapter")

CONNECTOR_KEY = "connector:{node}"
USABLE = ("available", "in-use")


class Adapter:
    """The backend operations of one worker process (cinderlib is set up once per process)."""

    def __init__(self, config: WorkerConfig) -> None:
        setup_cinderlib(config)
        self.persistence = cinderlib.Backend.persistence
        self.rows = Rows(database.engine(config.backend_timeout), self.persistence)
        self.backends = Backends(config.backends)

    @property
    def backend_errors(self) -> dict[str, str | None]:
        """Backend name -> why it failed to initialise, or None: the worker reports it when ready."""
        return self.backends.errors

    def run(self, operation: str, kwargs: dict[str, Any]) -> Any:
        method: Callable[..., Any] | None = getattr(self, f"op_{operation}", None)
        if method is None:
            raise errors.Internal(f"unknown backend operation {operation!r}")
        # After a failure, drop the idle connections: whatever failed may have broken them.
        return failures.retrying(operation, partial(method, **kwargs), after_failure=self.drop_idle_connections)

    def drop_idle_connections(self) -> None:
        """Shut down the storage connections kept open between calls (see :mod:`rados_reuse`)."""
        self.backends.drop_idle_connections()

    # --- lookups ------------------------------------------------------------------------------------

    def _require_volume(self, volume_id: str) -> objects.Volume:
        volume = self.rows.volume(volume_id)
        if volume is None:
            raise errors.NotFound(f"volume {volume_id} does not exist")
        return volume

    def op_get_volume(self, volume_id: str) -> VolumeRecord | None:
        volume = self.rows.volume(volume_id)
        return volume_record(volume) if volume else None

    def op_find_volume(self, name: str) -> VolumeRecord | None:
        found = self.persistence.get_volumes(volume_name=name)
        return volume_record(found[0]) if found else None

    def op_list_volumes(self) -> list[VolumeRecord]:
        return [volume_record(v) for v in self.persistence.get_volumes()]

    def op_get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        snapshot = self.rows.snapshot(snapshot_id)
        return snapshot_record(snapshot) if snapshot else None

    def op_list_snapshots(self) -> list[SnapshotRecord]:
        return [snapshot_record(s) for s in self.persistence.get_snapshots()]

    def op_stats(self, backend: str) -> dict[str, Any]:
        return summarize_stats(self.backends.get(backend).stats(refresh=True))

    def op_volume_present(self, volume_id: str) -> tuple[bool | None, str]:
        """Whether the storage still has the volume: (True/False, why) or (None, why) when unknowable.

        Uses the driver's ``manage_existing_get_size`` (Cinder's generic "does this exist, how big"
        call), which most drivers implement.
        """
        volume = self._require_volume(volume_id)
        try:
            volume.backend.driver.manage_existing_get_size(volume._ovo, {"source-name": volume._ovo.name})
        except NotImplementedError:
            return None, "the backend driver cannot check for the volume"
        except (cinder_exception.ManageExistingInvalidReference, cinder_exception.NotFound):
            return False, f"volume {volume_id} is missing on backend {volume.backend.id}"
        except Exception as exc:
            return False, f"cannot check volume {volume_id} on backend {volume.backend.id}: {exc}"
        return True, "volume is present on the backend"

    # --- volumes ------------------------------------------------------------------------------------

    def op_create_volume(
        self,
        backend: str,
        name: str,
        size_gib: int,
        metadata: dict[str, str],
        source_volume_id: str | None = None,
        source_snapshot_id: str | None = None,
    ) -> tuple[VolumeRecord, bool]:
        """Create (or finish creating) the volume called ``name``: (its record, True), or (the record of
        an existing usable volume of that name, False) for the front to compare with the request."""
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
            if snapshot is None:
                raise errors.NotFound(f"source snapshot {source_snapshot_id} does not exist")
            self._check_same_backend(snapshot.backend.id, backend, "snapshot", source_snapshot_id)
            volume = objects.Volume(target, size=snapshot.volume_size, snapshot_id=snapshot.id, **fields)
            make = partial(target.driver.create_volume_from_snapshot, volume._ovo, snapshot._ovo)
        elif source_volume_id:
            source = self._require_volume(source_volume_id)
            self._check_same_backend(source.backend.id, backend, "volume", source_volume_id)
            volume = objects.Volume(target, size=source.size, source_volid=source.id, **fields)
            make = partial(target.driver.create_cloned_volume, volume._ovo, source._ovo)
        else:
            volume = objects.Volume(target, size=size_gib, **fields)
            make = partial(target.driver.create_volume, volume._ovo)

        volume._ovo.created_at = _utcnow()
        self.rows.insert(volume)  # recorded before the storage is touched: see the module docstring
        try:
            self.rows.mark_available(volume, make())
            if volume.size < size_gib:  # a copy is as big as its source: grow it to what was asked
                self._extend(volume, size_gib)
        except Exception:
            self._destroy_volume(volume)
            raise
        return volume_record(volume, published={}, snapshot_ids=()), True

    @staticmethod
    def _check_same_backend(source_backend: str, backend: str, kind: str, source_id: str) -> None:
        if source_backend != backend:
            raise errors.InvalidArgument(
                f"source {kind} {source_id} is on backend {source_backend}, not {backend}: a volume can only be "
                "made from a source on its own backend"
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

    def op_delete_volume(self, volume_id: str) -> None:
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
            self._destroy_volume(volume)

    def op_extend_volume(self, volume_id: str, size_gib: int) -> VolumeRecord:
        volume = self._require_volume(volume_id)
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

    # --- snapshots ----------------------------------------------------------------------------------

    def op_create_snapshot(self, volume_id: str, name: str) -> SnapshotRecord:
        """Create (or finish creating) the snapshot called ``name`` of ``volume_id``; an available snapshot
        of that name is returned as it is, whatever its volume, for the front to compare with the request."""
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

    def op_delete_snapshot(self, snapshot_id: str) -> None:
        snapshot = self.rows.snapshot(snapshot_id)
        if snapshot is not None:
            self._destroy_snapshot(snapshot)

    # --- publication --------------------------------------------------------------------------------

    def op_set_connector(self, node_id: str, properties: dict[str, Any]) -> None:
        self.persistence.set_key_value(objects.KeyValue(CONNECTOR_KEY.format(node=node_id), json.dumps(properties)))

    def op_get_connector(self, node_id: str) -> dict[str, Any] | None:
        found = self.persistence.get_key_values(CONNECTOR_KEY.format(node=node_id))
        return json.loads(found[0].value) if found else None

    def op_connect(
        self, volume_id: str, node_id: str, readonly: bool, connector: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Connection info for ``node_id`` (the existing one when already connected there), connecting
        with the node's ``connector`` properties otherwise."""
        volume = self._require_volume(volume_id)
        for connection in volume.connections:
            if connection.attached_host == node_id:
                return connection.conn_info
        if connector is None:
            raise errors.NotFound(f"node {node_id}'s connector properties are unknown")
        connection = volume.connect(connector, attached_host=node_id, attach_mode="ro" if readonly else "rw")
        return connection.conn_info

    def op_disconnect(self, volume_id: str, node_id: str | None) -> None:
        volume = self.rows.volume(volume_id)
        if volume is None:
            return
        for connection in list(volume.connections):
            if node_id is None or connection.attached_host == node_id:
                volume.disconnect(connection)


def _utcnow() -> datetime.datetime:
    """Now, as the naive UTC datetime cinder keeps."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
