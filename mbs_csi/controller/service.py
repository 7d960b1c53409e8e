"""CSI Controller service: validates, holds the per-volume/per-name locks, and makes each call's backend
work one operation of the typed interface (``operations.py``): one round trip to a backend worker. No
cinder code runs in this process."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from csi import csi_pb2, csi_pb2_grpc
from mbs_csi import alpha, errors, mutable_parameters
from mbs_csi.capabilities import access, require
from mbs_csi.config import Backend, Settings
from mbs_csi.controller import validate
from mbs_csi.controller.connector_store import ConnectorStore, gone_or_present
from mbs_csi.controller.messages import csi_snapshot
from mbs_csi.controller.operations import BackendOperations
from mbs_csi.controller.records import GIB, AttachLimits, VolumeRecord
from mbs_csi.inflight import DatabaseLocks, InFlight
from mbs_csi.publish_context import to_publish_context

RPC = csi_pb2.ControllerServiceCapability.RPC
USABLE = ("available", "in-use")
STATS_TTL = 30.0  # seconds a backend's stats are reused for GetCapacity and multiattach checks

# What a volume remembers about the request that made it, in its metadata (cinder caps values at 255).
META_ACCESS = "csi.access_type"
META_FS = "csi.fs_type"
META_PARAMETERS = "csi.parameters_sha256"
META_MUTABLE = "csi.mutable_parameters_sha256"  # only when CreateVolume had mutable_parameters

T = TypeVar("T")


def _digest(parameters: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()


def _parameters_digest(parameters: dict[str, str]) -> str:
    return _digest({k: v for k, v in parameters.items() if not k.startswith(validate.K8S_PARAMETER_PREFIX)})


def attach_limits(settings: Settings) -> AttachLimits:
    """The controller's own ``max_volumes_per_node`` (a node announces its limit to the CO, not to us)."""
    per_backend = {b.name: b.max_volumes_per_node for b in settings.backends if b.max_volumes_per_node}
    return AttachLimits(settings.max_volumes_per_node, per_backend)


def paginate(items: Sequence[T], key: Callable[[T], str], max_entries: int, token: str) -> tuple[list[T], str]:
    """A page of ``items`` (sorted by ``key``) starting at ``token``, and the next token ("" at the end).

    Tokens are the key of the first item of the next page, so pages stay stable while items come and go.
    """
    if max_entries < 0:
        raise errors.InvalidArgument("max_entries cannot be negative")
    ordered = sorted(items, key=key)
    start = 0
    if token:
        starts = [i for i, item in enumerate(ordered) if key(item) >= token]
        if not starts or key(ordered[starts[0]]) != token:
            raise errors.Aborted(f"starting_token {token!r} is not valid (any more); list again from the start")
        start = starts[0]
    end = len(ordered) if not max_entries else min(len(ordered), start + max_entries)
    return ordered[start:end], key(ordered[end]) if end < len(ordered) else ""


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, settings: Settings, backend: BackendOperations, connectors: ConnectorStore) -> None:
        self.settings = settings
        self.backend = backend
        self.connectors = connectors
        shared_database = settings.database.startswith("postgresql")
        self.inflight = InFlight(DatabaseLocks(settings.database, settings.workers) if shared_database else None)
        self._stats: dict[str, tuple[float, dict[str, Any]]] = {}
        self._stats_lock = threading.Lock()
        self.attach_limits = attach_limits(settings)

    # --- helpers ------------------------------------------------------------------------------------

    def stats(self, backend: Backend) -> dict[str, Any]:
        with self._stats_lock:
            cached = self._stats.get(backend.name)
        if cached and time.monotonic() - cached[0] < STATS_TTL:
            return cached[1]
        stats = self.backend.stats(backend.name)
        with self._stats_lock:
            self._stats[backend.name] = (time.monotonic(), stats)
        return stats

    def _volume(self, volume_id: str) -> VolumeRecord:
        record = self.backend.get_volume(volume_id)
        if record is None or record.status not in USABLE:
            raise errors.NotFound(f"volume {volume_id} does not exist")
        return record

    def _csi_volume(self, record: VolumeRecord) -> csi_pb2.Volume:
        backend = self.settings.backend(record.backend)
        source = csi_pb2.VolumeContentSource()
        if record.source_snapshot_id:
            source.snapshot.snapshot_id = record.source_snapshot_id
        elif record.source_volume_id:
            source.volume.volume_id = record.source_volume_id
        return csi_pb2.Volume(
            volume_id=record.id,
            capacity_bytes=record.size_bytes,
            volume_context={"backend": record.backend},
            content_source=source if source.WhichOneof("type") else None,
            accessible_topology=validate.accessible_topology(backend, None) if backend else [],
        )

    # --- volumes ------------------------------------------------------------------------------------

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        validate.identifiers(request)
        require(request.name, "name")
        backend = validate.backend_for(self.settings, request.parameters)
        caps = list(request.volume_capabilities)
        require(caps, "volume_capabilities")
        wants = access(caps, multiattach=self.stats(backend)["multiattach"])
        validate.accessible_topology(  # the answer carries the backend's topology; this checks the request's
            backend, request.accessibility_requirements if request.HasField("accessibility_requirements") else None
        )
        capacity = request.capacity_range if request.HasField("capacity_range") else None
        source_kind = request.volume_content_source.WhichOneof("type")
        source_snapshot = request.volume_content_source.snapshot.snapshot_id if source_kind == "snapshot" else ""
        source_volume = request.volume_content_source.volume.volume_id if source_kind == "volume" else ""
        if source_kind and not (source_snapshot or source_volume):
            raise errors.InvalidArgument(f"volume_content_source {source_kind} needs an id")
        mutable = dict(request.mutable_parameters)
        mutable_parameters.check(backend.name, backend.mutable_parameters, mutable)
        metadata = {
            META_ACCESS: wants.type,
            META_FS: wants.fs_type,
            META_PARAMETERS: _parameters_digest(dict(request.parameters)),
            **({META_MUTABLE: _digest(mutable)} if mutable else {}),
        }
        sources = (
            f"snapshot:{source_snapshot}" if source_snapshot else "",
            f"volume:{source_volume}" if source_volume else "",
        )
        size_gib = validate.size_gib(capacity)  # the worker makes it at least its source's size
        with self.inflight.hold(f"name:{request.name}", shared=sources):
            record, created = self.backend.create_volume(
                backend.name,
                request.name,
                size_gib,
                capacity.limit_bytes if capacity else 0,
                metadata,
                source_volume_id=source_volume or None,
                source_snapshot_id=source_snapshot or None,
                mutable=mutable,
            )
            if not created:
                self._check_same_request(record, backend, capacity, source_snapshot, source_volume, metadata)
        return csi_pb2.CreateVolumeResponse(volume=self._csi_volume(record))

    @staticmethod
    def _check_same_request(
        existing: VolumeRecord,
        backend: Backend,
        capacity: csi_pb2.CapacityRange | None,
        source_snapshot: str,
        source_volume: str,
        metadata: dict[str, str],
    ) -> None:
        differences = []
        if existing.backend != backend.name:
            differences.append(f"it is on backend {existing.backend}")
        if not validate.fits(existing.size_bytes, capacity):
            differences.append(f"its size is {existing.size_bytes} bytes")
        if (existing.source_snapshot_id or "") != source_snapshot or (existing.source_volume_id or "") != source_volume:
            differences.append("it has another content source")
        labels = (
            (META_ACCESS, "access type"),
            (META_FS, "fs_type"),
            (META_PARAMETERS, "parameters"),
            (META_MUTABLE, "mutable_parameters"),
        )
        for key, label in labels:
            if existing.metadata.get(key, "") != metadata.get(key, ""):
                differences.append(f"its {label} differs")
        if differences:
            raise errors.AlreadyExists(
                f"volume {existing.name} already exists ({existing.id}) and does not match this request: "
                + "; ".join(differences)
            )

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        validate.identifiers(request)
        require(request.volume_id, "volume_id")
        with self.inflight.hold(f"volume:{request.volume_id}"):
            self.backend.delete_volume(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        validate.identifiers(request)
        require(request.volume_id, "volume_id")
        require(request.node_id, "node_id")
        require(request.HasField("volume_capability"), "volume_capability")
        # The form of the capability is checked here; whether the volume's backend supports multiattach,
        # by the worker, which knows the volume's backend.
        wants = access([request.volume_capability], multiattach=True)
        connector = self.connectors.connector(request.node_id)
        with self.inflight.hold(f"volume:{request.volume_id}"):
            info = self.backend.publish_volume(
                request.volume_id, request.node_id, request.readonly, wants.multi_node, connector, self.attach_limits
            )
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=to_publish_context(info))

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        validate.identifiers(request)
        require(request.volume_id, "volume_id")
        connector = gone_or_present(self.connectors, request.node_id) if request.node_id else None
        with self.inflight.hold(f"volume:{request.volume_id}"):
            self.backend.unpublish_volume(request.volume_id, request.node_id or None, connector)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        validate.identifiers(request)
        require(request.volume_id, "volume_id")
        require(list(request.volume_capabilities), "volume_capabilities")
        record = self._volume(request.volume_id)
        backend = self.settings.backend(record.backend)
        try:
            validate.backend_for(self.settings, request.parameters)
            wants = access(
                request.volume_capabilities, multiattach=backend is not None and self.stats(backend)["multiattach"]
            )
        except errors.InvalidArgument as exc:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=str(exc))
        if wants.type != record.metadata.get(META_ACCESS, wants.type):
            return csi_pb2.ValidateVolumeCapabilitiesResponse(
                message=f"volume {record.id} was created as a {record.metadata[META_ACCESS]} volume"
            )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
                mutable_parameters=request.mutable_parameters,
            )
        )

    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        records = [r for r in self.backend.list_volumes() if r.status in USABLE]
        page, next_token = paginate(records, lambda r: r.id, request.max_entries, request.starting_token)
        entries = [
            csi_pb2.ListVolumesResponse.Entry(
                volume=self._csi_volume(r),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(published_node_ids=sorted(r.published)),
            )
            for r in page
        ]
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetCapacityResponse:
        backend = validate.backend_for(self.settings, request.parameters)
        stats = self.stats(backend)
        empty = csi_pb2.GetCapacityResponse(available_capacity=0)
        if request.HasField("accessible_topology") and not validate.reachable_from(
            backend, [request.accessible_topology]
        ):
            return empty
        if request.volume_capabilities:
            try:
                access(request.volume_capabilities, multiattach=stats["multiattach"])
            except errors.InvalidArgument:
                return empty
        free = int((stats["free_capacity_gb"] or 0) * GIB)
        return csi_pb2.GetCapacityResponse(
            available_capacity=free,
            maximum_volume_size={"value": free},
            minimum_volume_size={"value": validate.DEFAULT_SIZE_GIB * GIB},
        )

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        rpcs = [
            RPC.CREATE_DELETE_VOLUME,
            RPC.PUBLISH_UNPUBLISH_VOLUME,
            RPC.LIST_VOLUMES,
            RPC.LIST_VOLUMES_PUBLISHED_NODES,
            RPC.GET_CAPACITY,
            RPC.CREATE_DELETE_SNAPSHOT,
            RPC.LIST_SNAPSHOTS,
            RPC.GET_SNAPSHOT,
            RPC.CLONE_VOLUME,
            RPC.PUBLISH_READONLY,
            RPC.EXPAND_VOLUME,
            RPC.GET_VOLUME,
            RPC.VOLUME_CONDITION,
            RPC.SINGLE_NODE_MULTI_WRITER,
            RPC.MODIFY_VOLUME,
        ]
        rpcs = alpha.advertised(RPC.Type, rpcs, self.settings.alpha_capabilities)
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.ControllerServiceCapability(rpc=RPC(type=t)) for t in rpcs]
        )

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        validate.identifiers(request)
        require(request.volume_id, "volume_id")
        require(request.HasField("capacity_range"), "capacity_range")
        size_gib = validate.size_gib(request.capacity_range)
        with self.inflight.hold(f"volume:{request.volume_id}"):
            record = self.backend.extend_volume(request.volume_id, size_gib, request.capacity_range.limit_bytes)
        # The node has work either way: grow the filesystem, or rescan the device for a block volume.
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=record.size_bytes, node_expansion_required=True)

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        validate.identifiers(request)
        require(request.volume_id, "volume_id")
        require(request.mutable_parameters, "mutable_parameters")  # REQUIRED by the spec
        # Which keys the volume's backend accepts is checked by the worker, which knows the backend.
        with self.inflight.hold(f"volume:{request.volume_id}"):
            self.backend.modify_volume(request.volume_id, dict(request.mutable_parameters))
        return csi_pb2.ControllerModifyVolumeResponse()

    def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeResponse:
        validate.identifiers(request)
        require(request.volume_id, "volume_id")
        check = self.backend.check_volume(request.volume_id)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._csi_volume(check.volume),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=sorted(check.volume.published),
                volume_condition=csi_pb2.VolumeCondition(abnormal=check.present is False, message=check.message),
            ),
        )

    # --- snapshots ----------------------------------------------------------------------------------

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        validate.identifiers(request)
        require(request.name, "name")
        require(request.source_volume_id, "source_volume_id")
        with self.inflight.hold(f"snapshot-name:{request.name}", shared=[f"volume:{request.source_volume_id}"]):
            # One backend round trip: an available snapshot of that name is returned as it is, of any volume.
            record = self.backend.create_snapshot(request.source_volume_id, request.name)
            if record.volume_id != request.source_volume_id:
                raise errors.AlreadyExists(
                    f"snapshot {request.name} already exists ({record.id}) of another volume, {record.volume_id}"
                )
        return csi_pb2.CreateSnapshotResponse(snapshot=csi_snapshot(record))

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        validate.identifiers(request)
        require(request.snapshot_id, "snapshot_id")
        with self.inflight.hold(f"snapshot:{request.snapshot_id}"):
            self.backend.delete_snapshot(request.snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        validate.identifiers(request)
        records = [s for s in self.backend.list_snapshots() if s.status == "available"]
        if request.snapshot_id:
            records = [s for s in records if s.id == request.snapshot_id]
        if request.source_volume_id:
            records = [s for s in records if s.volume_id == request.source_volume_id]
        page, next_token = paginate(records, lambda s: s.id, request.max_entries, request.starting_token)
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=csi_snapshot(s)) for s in page],
            next_token=next_token,
        )

    def GetSnapshot(
        self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetSnapshotResponse:
        validate.identifiers(request)
        require(request.snapshot_id, "snapshot_id")
        record = self.backend.get_snapshot(request.snapshot_id)
        if record is None or record.status != "available":
            raise errors.NotFound(f"snapshot {request.snapshot_id} does not exist")
        return csi_pb2.GetSnapshotResponse(snapshot=csi_snapshot(record))
