"""CSI GroupController service (volume group snapshots) in the gRPC front: checks, locks and dispatch,
one backend round trip per call, sharing the Controller service's locks, backend client and views.
The work on the storage is in ``groups.py``, in a worker.

A VolumeGroupSnapshotClass takes one parameter, ``consistency``: ``strict`` (the default) takes group
snapshots only on backends whose driver makes them at one point in time, and refuses with
FAILED_PRECONDITION elsewhere; ``loose`` accepts member snapshots taken one after the other.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from csi import csi_pb2, csi_pb2_grpc
from mbs_csi import errors
from mbs_csi.capabilities import require
from mbs_csi.controller import validate
from mbs_csi.controller.messages import csi_group_snapshot
from mbs_csi.controller.service import ControllerService

GroupRPC = csi_pb2.GroupControllerServiceCapability.RPC
CONSISTENCY_PARAMETER = "consistency"
STRICT = "strict"
LOOSE = "loose"


def loose_consistency(parameters: Mapping[str, str]) -> bool:
    """Whether the class's parameters accept member snapshots taken one after the other."""
    unknown = sorted(
        k for k in parameters if k != CONSISTENCY_PARAMETER and not k.startswith(validate.K8S_PARAMETER_PREFIX)
    )
    if unknown:
        raise errors.InvalidArgument(
            f"unknown parameter(s) {', '.join(unknown)}; accepted: {CONSISTENCY_PARAMETER}, "
            f"{validate.K8S_PARAMETER_PREFIX}*"
        )
    value = parameters.get(CONSISTENCY_PARAMETER, STRICT)
    if value not in (STRICT, LOOSE):
        raise errors.InvalidArgument(f"parameter {CONSISTENCY_PARAMETER} is {value!r}; accepted: {STRICT}, {LOOSE}")
    return value == LOOSE


class GroupControllerService(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, controller: ControllerService) -> None:
        self.controller = controller
        self.backend = controller.backend
        self.inflight = controller.inflight  # one set of locks for snapshots and group snapshots

    def GroupControllerGetCapabilities(
        self, request: csi_pb2.GroupControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        return csi_pb2.GroupControllerGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.GroupControllerServiceCapability(
                    rpc=GroupRPC(type=GroupRPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)
                )
            ]
        )

    def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        validate.identifiers(request)
        require(request.name, "name")
        volume_ids = list(request.source_volume_ids)
        require(volume_ids, "source_volume_ids")
        if not all(volume_ids):
            raise errors.InvalidArgument("source_volume_ids holds an empty volume id")
        if len(set(volume_ids)) != len(volume_ids):
            raise errors.InvalidArgument("source_volume_ids names a volume more than once")
        loose = loose_consistency(request.parameters)
        with self.inflight.hold(f"group-snapshot-name:{request.name}", shared=[f"volume:{v}" for v in volume_ids]):
            # One backend round trip: an available group snapshot of that name is returned as it is.
            record = self.backend.create_group_snapshot(request.name, sorted(volume_ids), loose)
        if record.source_volume_ids != set(volume_ids):
            raise errors.AlreadyExists(
                f"group snapshot {request.name} already exists ({record.id}) of other volumes: "
                + ", ".join(sorted(record.source_volume_ids))
            )
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=csi_group_snapshot(record))

    def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        validate.identifiers(request)
        require(request.group_snapshot_id, "group_snapshot_id")
        snapshot_ids = list(request.snapshot_ids)
        require(snapshot_ids, "snapshot_ids")
        keys = [f"group-snapshot:{request.group_snapshot_id}", *(f"snapshot:{s}" for s in snapshot_ids)]
        with self.inflight.hold(*keys):
            self.backend.delete_group_snapshot(request.group_snapshot_id, snapshot_ids)
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        validate.identifiers(request)
        require(request.group_snapshot_id, "group_snapshot_id")
        snapshot_ids = list(request.snapshot_ids)
        require(snapshot_ids, "snapshot_ids")
        record = self.backend.get_group_snapshot(request.group_snapshot_id)
        if record is None or record.status != "available":
            raise errors.NotFound(f"group snapshot {request.group_snapshot_id} does not exist")
        record.check_members(snapshot_ids)
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=csi_group_snapshot(record))
