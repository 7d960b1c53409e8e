"""cinderlib, seen from a backend worker: the only module of the driver that imports cinder/cinderlib.

Each public ``op_*`` method is one operation the front can ask for (``Adapter.run``). They return plain
records (``records.py``) and raise the driver's own errors; cinder's exceptions are translated here.

Crash safety: a new volume or snapshot is recorded in the database (status ``creating``) *before* the
driver is asked to make it, and the record is removed again when the driver call fails. If the process
dies in between, the next request for the same name finds the ``creating`` record and deletes whatever
the storage holds under it before trying again: nothing is left on the storage without a record.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import cinderlib
import sqlalchemy
from cinder import exception as cinder_exception
from cinder.db.sqlalchemy import api as cinder_db
from cinderlib import objects

from mbs_csi import errors, logs
from mbs_csi.controller.persistence import SecretFreePersistence
from mbs_csi.controller.rados_reuse import RadosConnections, reuse_connections
from mbs_csi.controller.records import BackendSpec, SnapshotRecord, VolumeRecord, WorkerConfig
from mbs_csi.controller.rows import Rows

log = logging.getLogger("mbs_csi.adapter")

CONNECTOR_KEY = "connector:{node}"
USABLE = ("available", "in-use")
# Every replica names itself the same, so volume "host" fields do not depend on which one made them.
CINDER_HOST = "mbs-csi"


def _tune_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Make the embedded SQLite database cheap to use from several worker processes.

    - Keep connections open: SQLAlchemy 1.4 opens a new SQLite connection for every transaction
      (NullPool), which costs more than the statements themselves. A worker runs one call at a time,
      so a small pool suffices. (SQLAlchemy 2 pools SQLite connections by default.)
    - Write-ahead log: readers no longer wait for a writer in another worker, and a commit costs one
      fsync instead of several. ``synchronous=FULL`` keeps every commit durable.
    """
    old = engine.pool
    # Same connection factory and event listeners (oslo.db's among them), pooled.
    engine.pool = sqlalchemy.pool.QueuePool(
        old._creator, pool_size=1, max_overflow=4, dialect=old._dialect, _dispatch=old.dispatch
    )
    old.dispose()

    @sqlalchemy.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()


# Seconds to wait before each new attempt of an operation the storage library refused as busy.
BUSY_RETRY_DELAYS = (0.1, 0.3, 1.0, 2.0)


def _busy(exc: Exception) -> bool:
    """Whether the storage refused because something else is using the volume or snapshot right now."""
    return isinstance(exc, cinder_exception.VolumeIsBusy | cinder_exception.SnapshotIsBusy) or _library_busy(exc)


def _library_busy(exc: Exception) -> bool:
    """A storage library's own "busy" that the driver let through without retrying, such as librbd's
    ImageBusy when several clients change one image's snapshots at once (seen at 16 concurrent
    DeleteSnapshot calls on Ceph). Cinder's *IsBusy come after the driver's own retries."""
    return type(exc).__name__ == "ImageBusy"


def _connection_lost(exc: BaseException | None) -> bool:
    """True when ``exc`` or an exception behind it says the storage connection was shut down (ESHUTDOWN:
    a blocklisted Ceph client, for one); a new connection may well succeed."""
    for _ in range(10):  # a chain can loop back on itself
        if exc is None:
            return False
        if getattr(exc, "errno", None) == errno.ESHUTDOWN:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _translate(exc: Exception) -> errors.CSIError | None:
    """Our error for a cinder exception, or None to let it surface as an unexpected failure."""
    message = str(getattr(exc, "msg", None) or exc)
    if _busy(exc):
        return errors.Aborted(
            f"the storage reports the volume or snapshot busy ({type(exc).__name__}: {message}); try again later"
        )
    if isinstance(exc, cinder_exception.NotFound):
        return errors.NotFound(message)
    if isinstance(exc, cinder_exception.InvalidInput | cinder_exception.InvalidVolume):
        return errors.FailedPrecondition(message)
    if isinstance(exc, cinder_exception.CinderException):
        return errors.Internal(f"the storage backend refused: {message}")
    return None


class Adapter:
    def __init__(self, config: WorkerConfig) -> None:
        os.makedirs(os.path.join(config.state_dir, "locks"), exist_ok=True)
        cinderlib.setup(
            persistence_config={"storage": SecretFreePersistence, "connection": config.database},
            file_locks_path=os.path.join(config.state_dir, "locks"),
            state_path=os.path.join(config.state_dir, "cinder"),
            disable_logs=False,
            host=CINDER_HOST,
        )
        logs.setup(config.log_level)  # cinderlib's setup installed oslo.log's handlers, which do not scrub
        self.persistence = cinderlib.Backend.persistence
        engine = cinder_db.get_engine()
        if engine.dialect.name == "sqlite":
            _tune_sqlite(engine)
        self.rows = Rows(engine, self.persistence)
        self.backends: dict[str, cinderlib.Backend] = {}
        self.backend_errors: dict[str, str | None] = {}
        self._connections: dict[str, RadosConnections] = {}
        self._specs = {spec.name: spec for spec in config.backends}
        for spec in config.backends:
            self._init_backend(spec)

    def _init_backend(self, spec: BackendSpec) -> None:
        try:
            backend = cinderlib.Backend(volume_backend_name=spec.name, volume_driver=spec.volume_driver, **spec.options)
            self.backends[spec.name] = backend
            self.backend_errors[spec.name] = None
            connections = reuse_connections(backend.driver)
            if connections is not None:
                self._connections[spec.name] = connections
        except Exception as exc:
            log.warning("backend %s failed to initialise: %s: %s", spec.name, type(exc).__name__, exc)
            self.backend_errors[spec.name] = f"{type(exc).__name__}: {exc}"

    def backend(self, name: str) -> cinderlib.Backend:
        if name not in self._specs:
            raise errors.InvalidArgument(f"unknown backend {name!r}")
        if name not in self.backends:  # failed before: try again, the storage may be back
            self._init_backend(self._specs[name])
        if name not in self.backends:
            raise errors.Unavailable(f"backend {name} is not initialised: {self.backend_errors[name]}")
        return self.backends[name]

    def run(self, operation: str, kwargs: dict[str, Any]) -> Any:
        method: Callable[..., Any] | None = getattr(self, f"op_{operation}", None)
        if method is None:
            raise errors.Internal(f"unknown backend operation {operation!r}")
        busy_delays = iter(BUSY_RETRY_DELAYS)
        reconnected = False
        while True:  # every operation is idempotent: running it again is safe
            try:
                return method(**kwargs)
            except errors.CSIError:
                raise
            except Exception as exc:
                self.drop_idle_connections()  # whatever failed may have broken them
                if not reconnected and _connection_lost(exc):
                    log.info("%s: the storage connection was shut down (%s); trying again on a new one", operation, exc)
                    reconnected = True
                    continue
                delay = next(busy_delays, None) if _library_busy(exc) else None
                if delay is not None:
                    log.info("%s: the storage is busy (%s); trying again in %.1f s", operation, exc, delay)
                    time.sleep(delay)
                    continue
                translated = _translate(exc)
                if translated is None:
                    raise
                raise translated from exc

    def drop_idle_connections(self) -> None:
        """Shut down the storage connections kept open between calls (see :mod:`rados_reuse`)."""
        for connections in self._connections.values():
            connections.drop_idle()

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

    def op_stats(self, backend: str, refresh: bool = True) -> dict[str, Any]:
        return summarize_stats(self.backend(backend).stats(refresh=refresh))

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
        target = self.backend(backend)
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
                volume.extend(size_gib)
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
            if not _busy(exc):
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
            volume.extend(size_gib)
        return volume_record(self._require_volume(volume_id))

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


def _epoch(ovo: Any) -> float:
    """``created_at`` as seconds since the epoch; cinder keeps naive UTC datetimes."""
    if not ovo.obj_attr_is_set("created_at") or ovo.created_at is None:
        return 0.0
    created = ovo.created_at
    return (created if created.tzinfo else created.replace(tzinfo=datetime.UTC)).timestamp()


def volume_record(
    volume: objects.Volume, published: dict[str, str] | None = None, snapshot_ids: tuple[str, ...] | None = None
) -> VolumeRecord:
    """The record of ``volume``; pass ``published``/``snapshot_ids`` when known, to skip reading them."""
    ovo = volume._ovo
    return VolumeRecord(
        id=volume.id,
        name=ovo.display_name or "",
        backend=volume.backend.id,
        size_gib=ovo.size,
        status=ovo.status,
        created_at=_epoch(ovo),
        source_volume_id=ovo.source_volid,
        source_snapshot_id=ovo.snapshot_id,
        metadata=dict(ovo.metadata or {}),
        published={c.attached_host: c.attach_mode for c in volume.connections} if published is None else published,
        snapshot_ids=tuple(s.id for s in volume.snapshots) if snapshot_ids is None else snapshot_ids,
    )


def snapshot_record(snapshot: objects.Snapshot) -> SnapshotRecord:
    ovo = snapshot._ovo
    return SnapshotRecord(
        id=snapshot.id,
        name=ovo.display_name or "",
        volume_id=ovo.volume_id,
        size_gib=ovo.volume_size,
        status=ovo.status,
        created_at=_epoch(ovo),
    )


def _gib(value: Any) -> float | None:
    """Cinder reports capacities in GiB, or as 'infinite'/'unknown'."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summarize_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The driver's stats reduced to what the controller and ``backend check`` use."""
    pools = stats.get("pools") or [stats]
    totals = [_gib(p.get("total_capacity_gb")) for p in pools]
    frees = [_gib(p.get("free_capacity_gb")) for p in pools]
    return {
        "total_capacity_gb": None if None in totals else sum(totals),  # type: ignore[arg-type]
        "free_capacity_gb": None if None in frees else sum(frees),  # type: ignore[arg-type]
        "storage_protocol": stats.get("storage_protocol"),
        "vendor_name": stats.get("vendor_name"),
        "driver_version": stats.get("driver_version"),
        "thin_provisioning": any(p.get("thin_provisioning_support") for p in pools),
        "multiattach": bool(stats.get("multiattach")) or any(p.get("multiattach") for p in pools),
        "pools": [p.get("pool_name") for p in pools],
    }
