"""ControllerModifyVolume and CreateVolume's mutable_parameters (Kubernetes' VolumeAttributesClass) on the
loopback backend, through the real ``mbs-csi`` process, on SQLite and PostgreSQL.

The loopback driver cannot enforce a QoS limit: it records it, in the volume's type. The tests read that
type back from the database, where Cinder's model keeps a volume's QoS and extra specs.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time

import grpc
import pytest

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc
from testkit.controller import controller_on, loopback_backend, unique
from testkit.csi_requests import create_request
from testkit.rpc import rpc_error
from testkit.wait import wait_until

Code = grpc.StatusCode
# The loopback driver's own QoS limits, and an extra spec it cannot honour (it refuses to be retyped to it).
ACCEPTED = ["total_iops_sec", "read_bytes_sec", "replication_enabled"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ctl(request, tmp_path_factory):
    backend = {**loopback_backend(tmp_path_factory.mktemp("loop")), "mutable_parameters": ACCEPTED}
    with controller_on(request, ("node-a",), backends=[backend]) as controller:
        yield controller


def modify(ctl, volume_id: str, **parameters: str) -> None:
    ctl.stub.ControllerModifyVolume(
        pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=parameters)
    )


def modify_error(ctl, volume_id: str, **parameters: str) -> grpc.RpcError:
    request = pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=parameters)
    return rpc_error(ctl.stub.ControllerModifyVolume, request)


def delete(ctl, volume_id: str) -> None:
    ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


def test_modify_volume_is_advertised(ctl):
    answer = ctl.stub.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    assert pb.ControllerServiceCapability.RPC.MODIFY_VOLUME in [c.rpc.type for c in answer.capabilities]


def test_create_with_mutable_parameters_records_them_and_shows_nothing_new(ctl):
    request = create_request(unique(), mutable_parameters={"total_iops_sec": "300"})
    volume = ctl.stub.CreateVolume(request).volume
    _, specs = ctl.volume_type(volume.volume_id)
    assert specs == {"total_iops_sec": "300"}
    # ControllerGetVolume and ListVolumes answer as for any volume.
    plain = ctl.stub.CreateVolume(create_request(unique())).volume
    got = ctl.stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume.volume_id)).volume
    assert got == volume and set(got.volume_context) == set(plain.volume_context)
    listed = {e.volume.volume_id: e.volume for e in ctl.stub.ListVolumes(pb.ListVolumesRequest()).entries}
    assert listed[volume.volume_id] == volume
    assert ctl.stub.CreateVolume(request).volume == volume  # the same request again: the same volume
    for volume_id in (volume.volume_id, plain.volume_id):
        delete(ctl, volume_id)
    assert not [name for name in ctl.volume_type_names() if volume.volume_id in name]


def test_create_refuses_a_key_the_backend_does_not_accept_and_a_different_repeat(ctl):
    error = rpc_error(ctl.stub.CreateVolume, create_request(unique(), mutable_parameters={"XXX_FakeKey": "1"}))
    assert error.code() == Code.INVALID_ARGUMENT and "XXX_FakeKey" in error.details()
    error = rpc_error(ctl.stub.CreateVolume, create_request(unique(), mutable_parameters={"total_iops_sec": "x"}))
    assert error.code() == Code.INVALID_ARGUMENT and "total_iops_sec must be a whole number" in error.details()
    name = unique()
    volume = ctl.stub.CreateVolume(create_request(name, mutable_parameters={"total_iops_sec": "100"})).volume
    for other in ({"total_iops_sec": "200"}, {}):
        error = rpc_error(ctl.stub.CreateVolume, create_request(name, mutable_parameters=other))
        assert error.code() == Code.ALREADY_EXISTS and "mutable_parameters differs" in error.details()
    delete(ctl, volume.volume_id)


def test_modify_changes_only_the_named_keys_and_twice_is_a_no_op(ctl):
    volume = ctl.stub.CreateVolume(create_request(unique())).volume  # made without mutable parameters
    modify(ctl, volume.volume_id, total_iops_sec="500", read_bytes_sec="1048576")
    assert ctl.volume_type(volume.volume_id)[1] == {"total_iops_sec": "500", "read_bytes_sec": "1048576"}
    modify(ctl, volume.volume_id, total_iops_sec="800")  # read_bytes_sec is not named: it stays
    type_id, specs = ctl.volume_type(volume.volume_id)
    assert specs == {"total_iops_sec": "800", "read_bytes_sec": "1048576"}
    modify(ctl, volume.volume_id, total_iops_sec="800")  # the same modify again
    assert ctl.volume_type(volume.volume_id) == (type_id, specs)  # nothing was retyped
    # One type per volume: the ones the modifies replaced are gone.
    assert [name for name in ctl.volume_type_names() if volume.volume_id in name] == [f"{volume.volume_id}+{type_id}"]
    assert ctl.stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume.volume_id)).volume == volume
    delete(ctl, volume.volume_id)
    assert not [name for name in ctl.volume_type_names() if volume.volume_id in name]


def test_modify_argument_checks(ctl):
    volume = ctl.stub.CreateVolume(create_request(unique(), mutable_parameters={"total_iops_sec": "100"})).volume
    before = ctl.volume_type(volume.volume_id)
    cases = [
        ("", {"total_iops_sec": "1"}, Code.INVALID_ARGUMENT, "volume_id is required"),
        (volume.volume_id, {}, Code.INVALID_ARGUMENT, "mutable_parameters is required"),
        ("no-such-volume", {"total_iops_sec": "1"}, Code.NOT_FOUND, "volume no-such-volume does not exist"),
        (volume.volume_id, {"XXX_FakeKey": "v"}, Code.INVALID_ARGUMENT, "XXX_FakeKey cannot be applied on backend"),
        (volume.volume_id, {"total_iops_sec": "-5"}, Code.INVALID_ARGUMENT, "must be a whole number"),
    ]
    for volume_id, parameters, code, message in cases:
        error = modify_error(ctl, volume_id, **parameters)
        assert (error.code(), message in error.details()) == (code, True), error.details()
    assert ctl.volume_type(volume.volume_id) == before
    delete(ctl, volume.volume_id)


def test_a_retype_the_driver_refuses_leaves_the_volume_unchanged(ctl):
    volume = ctl.stub.CreateVolume(create_request(unique(), mutable_parameters={"total_iops_sec": "100"})).volume
    before = ctl.volume_type(volume.volume_id)
    error = modify_error(ctl, volume.volume_id, total_iops_sec="900", replication_enabled="<is> True")
    assert error.code() == Code.INVALID_ARGUMENT
    assert "its driver refused the retype" in error.details() and "the volume is unchanged" in error.details()
    assert ctl.volume_type(volume.volume_id) == before
    assert [name for name in ctl.volume_type_names() if volume.volume_id in name] == [f"{volume.volume_id}+{before[0]}"]
    delete(ctl, volume.volume_id)


def test_a_modify_racing_another_call_on_the_volume_answers_aborted(ctl):
    volume = ctl.stub.CreateVolume(create_request(unique())).volume
    wait_until(lambda: len(ctl.ready_worker_pids()) == 2, 120, "2 ready workers")
    workers = ctl.ready_worker_pids()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)  # the first modify holds the volume until they run again
    first = threading.Thread(target=modify, args=(ctl, volume.volume_id), kwargs={"total_iops_sec": "10"})
    try:
        first.start()
        called = f"ControllerModifyVolume called volume_id={volume.volume_id}"
        wait_until(lambda: called in ctl.driver.log(), 30, "the first modify to come in")
        time.sleep(0.5)  # from its log line to its lock: the front's own steps, no backend call
        request = pb.ControllerModifyVolumeRequest(
            volume_id=volume.volume_id, mutable_parameters={"total_iops_sec": "20"}
        )
        error = rpc_error(ctl.stub.ControllerModifyVolume, request, timeout=30)
        assert error.code() == Code.ABORTED and "in progress" in error.details()
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        first.join(60)
    assert ctl.volume_type(volume.volume_id)[1] == {"total_iops_sec": "10"}
    delete(ctl, volume.volume_id)


def test_a_modify_moves_the_snapshots_along_and_they_stay_usable(ctl):
    volume = ctl.stub.CreateVolume(create_request(unique(), mutable_parameters={"total_iops_sec": "100"})).volume
    snap = ctl.stub.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=volume.volume_id))
    modify(ctl, volume.volume_id, total_iops_sec="200")  # the old type goes: the snapshot must not point at it
    restored = ctl.stub.CreateVolume(create_request(unique(), snapshot=snap.snapshot.snapshot_id)).volume
    assert ctl.volume_type(restored.volume_id)[1] == {}  # a new volume has the parameters its request names
    ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot.snapshot_id))
    for volume_id in (restored.volume_id, volume.volume_id):
        delete(ctl, volume_id)


def test_a_type_left_by_a_killed_modify_is_removed_by_the_next_modify_or_the_delete(ctl):
    """A modify killed between recording the new type and switching the volume to it leaves that type;
    planted here as such a modify leaves it."""
    volume = ctl.stub.CreateVolume(create_request(unique(), mutable_parameters={"total_iops_sec": "100"})).volume
    kept = ctl.volume_type(volume.volume_id)

    def plant() -> str:
        name = f"{volume.volume_id}+{unique('type')}"
        ctl.execute(
            "INSERT INTO volume_types (created_at, deleted, id, name, is_public) VALUES (:now, :no, :id, :name, :yes)",
            now=datetime.datetime.now(datetime.UTC).replace(tzinfo=None),
            no=False,
            yes=True,
            id=name[-16:],
            name=name,
        )
        return name

    stale = plant()
    modify(ctl, volume.volume_id, total_iops_sec="100")  # nothing to change: it still cleans up
    assert stale not in ctl.volume_type_names() and ctl.volume_type(volume.volume_id) == kept
    stale = plant()
    delete(ctl, volume.volume_id)
    assert not [name for name in ctl.volume_type_names() if volume.volume_id in name]


def test_a_volume_in_a_group_snapshot_can_be_modified_and_the_group_deleted(ctl):
    """A group snapshot maps its volumes' types to its group (cinder's group_volume_type_mapping): a
    modify that replaces a member's type, and the group's deletion after it, must both work (PostgreSQL
    enforces the foreign keys)."""
    groups = csi_pb2_grpc.GroupControllerStub(ctl.driver.channel)
    volume = ctl.stub.CreateVolume(create_request(unique(), mutable_parameters={"total_iops_sec": "100"})).volume
    group = groups.CreateVolumeGroupSnapshot(
        pb.CreateVolumeGroupSnapshotRequest(
            name=unique(), source_volume_ids=[volume.volume_id], parameters={"consistency": "loose"}
        )
    ).group_snapshot
    modify(ctl, volume.volume_id, total_iops_sec="200")
    _, specs = ctl.volume_type(volume.volume_id)
    assert specs == {"total_iops_sec": "200"}
    groups.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id,
            snapshot_ids=[s.snapshot_id for s in group.snapshots],
        )
    )
    delete(ctl, volume.volume_id)
    assert not [name for name in ctl.volume_type_names() if volume.volume_id in name]
