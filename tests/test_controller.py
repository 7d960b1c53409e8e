"""Controller conformance: every controller RPC's argument checks, status codes and idempotency, through
the real ``mbs-csi`` process, real cinderlib, the loopback backend (real files and loop devices), and
both databases: SQLite and a real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from csi import csi_pb2 as pb
from testkit.controller import ZONE_KEY, ControllerUnderTest, controller_on, loopback_backend, unique
from testkit.csi_requests import GIB, Mode, block_cap, create_request, mount_cap
from testkit.rpc import rpc_error
from testkit.wait import wait_until

Code = grpc.StatusCode
RPC = pb.ControllerServiceCapability.RPC


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ctl(request):
    with controller_on(request, ("node-a", "node-b")) as controller:
        yield controller


def create(ctl, name: str | None = None, **kwargs) -> pb.Volume:
    return ctl.stub.CreateVolume(create_request(name or unique(), **kwargs)).volume


def snapshot(ctl, volume_id: str, name: str | None = None) -> pb.Snapshot:
    return ctl.stub.CreateSnapshot(
        pb.CreateSnapshotRequest(name=name or unique("snap"), source_volume_id=volume_id)
    ).snapshot


def publish(ctl, volume_id: str, node: str = "node-a", readonly: bool = False, cap=None):
    return ctl.stub.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node, readonly=readonly, volume_capability=cap or mount_cap()
        )
    )


def unpublish(ctl, volume_id: str, node: str = "node-a") -> None:
    ctl.stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node))


def delete(ctl, volume_id: str) -> None:
    ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


# --- capabilities ------------------------------------------------------------------------------------


def serves(ctl, capability: int, volume: pb.Volume, snap: pb.Snapshot) -> bool:
    """Whether the controller does what ``capability`` promises, tried on ``volume`` and ``snap``."""
    stub, volume_id = ctl.stub, volume.volume_id
    match capability:
        case RPC.CREATE_DELETE_VOLUME:
            made = create(ctl)
            existed = ctl.volume_file(made.volume_id).exists()
            delete(ctl, made.volume_id)
            return existed and not ctl.volume_file(made.volume_id).exists()
        case RPC.PUBLISH_UNPUBLISH_VOLUME:
            device = publish(ctl, volume_id).publish_context["device_path"]
            bound = ctl.loop_devices() == [device]
            unpublish(ctl, volume_id)
            return bound and ctl.loop_devices() == []
        case RPC.LIST_VOLUMES:
            return volume_id in {e.volume.volume_id for e in stub.ListVolumes(pb.ListVolumesRequest()).entries}
        case RPC.LIST_VOLUMES_PUBLISHED_NODES:
            publish(ctl, volume_id, "node-b")
            listed = stub.ListVolumes(pb.ListVolumesRequest()).entries
            unpublish(ctl, volume_id, "node-b")
            return [list(e.status.published_node_ids) for e in listed if e.volume.volume_id == volume_id] == [
                ["node-b"]
            ]
        case RPC.GET_CAPACITY:
            return stub.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[mount_cap()])).available_capacity > 0
        case RPC.CREATE_DELETE_SNAPSHOT:
            made = snapshot(ctl, volume_id)
            stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=made.snapshot_id))
            return (
                made.ready_to_use
                and not stub.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=made.snapshot_id)).entries
            )
        case RPC.LIST_SNAPSHOTS:
            listed = stub.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=volume_id)).entries
            return [e.snapshot for e in listed] == [snap]
        case RPC.GET_SNAPSHOT:
            return stub.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot == snap
        case RPC.CLONE_VOLUME:
            clone = create(ctl, volume=volume_id)
            delete(ctl, clone.volume_id)
            return clone.content_source.volume.volume_id == volume_id
        case RPC.PUBLISH_READONLY:
            context = publish(ctl, volume_id, readonly=True).publish_context
            unpublish(ctl, volume_id)
            return context["access_mode"] == "ro"
        case RPC.EXPAND_VOLUME:
            made = create(ctl)
            request = pb.ControllerExpandVolumeRequest(
                volume_id=made.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * GIB)
            )
            grown = stub.ControllerExpandVolume(request).capacity_bytes
            delete(ctl, made.volume_id)
            return grown == 2 * GIB
        case RPC.GET_VOLUME:
            return stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id)).volume == volume
        case RPC.VOLUME_CONDITION:
            status = stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id)).status
            return status.HasField("volume_condition") and not status.volume_condition.abnormal
        case RPC.MODIFY_VOLUME:
            request = pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters={"total_iops_sec": "50"})
            stub.ControllerModifyVolume(request)
            return ctl.volume_type(volume_id)[1] == {"total_iops_sec": "50"}
        case RPC.SINGLE_NODE_MULTI_WRITER:
            made = create(ctl, caps=[mount_cap(mode=Mode.SINGLE_NODE_MULTI_WRITER)])
            delete(ctl, made.volume_id)
            return True
    return False  # advertised, and nothing here knows how to try it: add it above


def test_every_advertised_capability_is_served(ctl):
    """What ControllerGetCapabilities advertises, the controller does: a CO calls those RPCs (and relies on
    those behaviours) only because they are advertised. A capability without a working RPC fails here."""
    answer = ctl.stub.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    advertised = [c.rpc.type for c in answer.capabilities]
    assert RPC.CREATE_DELETE_VOLUME in advertised and len(set(advertised)) == len(advertised)
    volume = create(ctl)
    snap = snapshot(ctl, volume.volume_id)
    unserved = [RPC.Type.Name(c) for c in advertised if not serves(ctl, c, volume, snap)]
    ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    delete(ctl, volume.volume_id)
    assert unserved == []


# --- CreateVolume ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (create_request(""), Code.INVALID_ARGUMENT, "name is required"),
        (pb.CreateVolumeRequest(name="x"), Code.INVALID_ARGUMENT, "volume_capabilities is required"),
        (
            create_request("x", parameters={"backend": "nope"}),
            Code.INVALID_ARGUMENT,
            "unknown backend 'nope'; configured backends: loop",
        ),
        (create_request("x", parameters={"pool": "p"}), Code.INVALID_ARGUMENT, "unknown parameter(s) pool"),
        (create_request("x", caps=[mount_cap("ntfs")]), Code.INVALID_ARGUMENT, "fs_type 'ntfs' is not supported"),
        (
            create_request("x", caps=[pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=1))]),
            Code.INVALID_ARGUMENT,
            "needs an access type",
        ),
        (create_request("x", caps=[mount_cap(mode=Mode.UNKNOWN)]), Code.INVALID_ARGUMENT, "UNKNOWN is not supported"),
        (
            create_request("x", caps=[mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]),
            Code.INVALID_ARGUMENT,
            "needs a block volume",
        ),
        (
            create_request("x", caps=[block_cap(Mode.MULTI_NODE_MULTI_WRITER)]),
            Code.INVALID_ARGUMENT,
            "needs a backend that supports multiattach",
        ),
        (create_request("x", caps=[mount_cap(), block_cap()]), Code.INVALID_ARGUMENT, "must agree on one access type"),
        (create_request("x", limit=GIB // 2), Code.OUT_OF_RANGE, "volumes are allocated in whole GiB"),
        (create_request("x", required=2 * GIB, limit=GIB), Code.INVALID_ARGUMENT, "exceeds limit_bytes"),
        (create_request("x", snapshot="no-such-snapshot"), Code.NOT_FOUND, "source snapshot no-such-snapshot"),
        (create_request("x", volume="no-such-volume"), Code.NOT_FOUND, "volume no-such-volume does not exist"),
        (
            create_request(
                "x",
                accessibility_requirements=pb.TopologyRequirement(
                    requisite=[pb.Topology(segments={ZONE_KEY: "zone-b"})]
                ),
            ),
            Code.RESOURCE_EXHAUSTED,
            "reachable only from",
        ),
    ],
)
def test_create_volume_argument_checks(ctl, request_, code, message):
    before = ctl.backend_volume_files()
    error = rpc_error(ctl.stub.CreateVolume, request_)
    assert error.code() == code
    assert message in error.details()
    assert ctl.backend_volume_files() == before


@pytest.mark.parametrize(
    ("required", "limit", "expected_gib"),
    [(0, 0, 1), (1, 0, 1), (GIB + 1, 0, 2), (3 * GIB, 3 * GIB, 3), (0, 5 * GIB + 7, 1)],
)
def test_create_volume_rounds_capacity_up_to_whole_gib(ctl, required, limit, expected_gib):
    volume = create(ctl, required=required, limit=limit)
    assert volume.capacity_bytes == expected_gib * GIB
    assert os.path.getsize(ctl.volume_file(volume.volume_id)) == expected_gib * GIB
    delete(ctl, volume.volume_id)
    assert not ctl.volume_file(volume.volume_id).exists()


def test_create_volume_answers_with_context_and_topology(ctl):
    volume = create(
        ctl,
        accessibility_requirements=pb.TopologyRequirement(
            requisite=[pb.Topology(segments={ZONE_KEY: "zone-a", "kubernetes.io/hostname": "n1"})]
        ),
    )
    assert dict(volume.volume_context) == {"backend": "loop"}
    assert [dict(t.segments) for t in volume.accessible_topology] == [{ZONE_KEY: "zone-a"}]
    delete(ctl, volume.volume_id)


def test_create_volume_is_idempotent_by_name(ctl):
    name = unique()
    first = create(ctl, name, required=GIB)
    again = create(ctl, name, required=GIB, limit=2 * GIB)
    assert again == first
    assert len([f for f in ctl.backend_volume_files() if first.volume_id in f.name]) == 1
    for different, why in [
        (create_request(name, required=3 * GIB), "its size is 1073741824 bytes"),
        (create_request(name, caps=[block_cap()]), "its access type differs"),
        (create_request(name, caps=[mount_cap("xfs")]), "its fs_type differs"),
        (create_request(name, volume=first.volume_id), "another content source"),
    ]:
        error = rpc_error(ctl.stub.CreateVolume, different)
        assert error.code() == Code.ALREADY_EXISTS, why
        assert why in error.details()
    delete(ctl, first.volume_id)


def test_volume_from_snapshot_holds_the_snapshot_data_and_grows_when_asked(ctl):
    source = create(ctl)
    with open(ctl.volume_file(source.volume_id), "r+b") as f:
        f.write(b"before-snapshot")
    snap = snapshot(ctl, source.volume_id)
    with open(ctl.volume_file(source.volume_id), "r+b") as f:
        f.write(b"after--snapshot")
    restored = create(ctl, snapshot=snap.snapshot_id, required=2 * GIB)
    assert restored.capacity_bytes == 2 * GIB
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    with open(ctl.volume_file(restored.volume_id), "rb") as f:
        assert f.read(15) == b"before-snapshot"
    assert os.path.getsize(ctl.volume_file(restored.volume_id)) == 2 * GIB
    too_small = rpc_error(ctl.stub.CreateVolume, create_request(unique(), limit=GIB // 2, snapshot=snap.snapshot_id))
    assert too_small.code() == Code.OUT_OF_RANGE
    for volume_id in (restored.volume_id,):
        delete(ctl, volume_id)
    ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    delete(ctl, source.volume_id)


def test_clone_copies_the_source_and_a_smaller_request_is_out_of_range(ctl):
    source = create(ctl, required=2 * GIB)
    with open(ctl.volume_file(source.volume_id), "r+b") as f:
        f.seek(GIB)
        f.write(b"data in the second GiB")
    clone = create(ctl, volume=source.volume_id)
    assert clone.capacity_bytes == 2 * GIB
    assert clone.content_source.volume.volume_id == source.volume_id
    with open(ctl.volume_file(clone.volume_id), "rb") as f:
        f.seek(GIB)
        assert f.read(22) == b"data in the second GiB"
    error = rpc_error(ctl.stub.CreateVolume, create_request(unique(), limit=GIB, volume=source.volume_id))
    assert error.code() == Code.OUT_OF_RANGE
    assert "the source is 2 GiB" in error.details()
    delete(ctl, clone.volume_id)
    delete(ctl, source.volume_id)


# --- DeleteVolume ------------------------------------------------------------------------------------


def test_delete_volume_checks_and_idempotency(ctl):
    assert rpc_error(ctl.stub.DeleteVolume, pb.DeleteVolumeRequest()).code() == Code.INVALID_ARGUMENT
    delete(ctl, str(uuid.uuid4()))  # unknown: OK
    volume = create(ctl)
    snap = snapshot(ctl, volume.volume_id)
    error = rpc_error(ctl.stub.DeleteVolume, pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert error.code() == Code.FAILED_PRECONDITION
    assert snap.snapshot_id in error.details()
    ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    publish(ctl, volume.volume_id, "node-b")
    error = rpc_error(ctl.stub.DeleteVolume, pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert error.code() == Code.FAILED_PRECONDITION
    assert "published to node(s) node-b" in error.details()
    unpublish(ctl, volume.volume_id, "node-b")
    delete(ctl, volume.volume_id)
    delete(ctl, volume.volume_id)
    assert not ctl.volume_file(volume.volume_id).exists()


# --- ControllerPublishVolume / ControllerUnpublishVolume --------------------------------------------


def test_publish_argument_checks(ctl):
    volume = create(ctl)
    cases = [
        (pb.ControllerPublishVolumeRequest(node_id="node-a", volume_capability=mount_cap()), Code.INVALID_ARGUMENT),
        (
            pb.ControllerPublishVolumeRequest(volume_id=volume.volume_id, volume_capability=mount_cap()),
            Code.INVALID_ARGUMENT,
        ),
        (pb.ControllerPublishVolumeRequest(volume_id=volume.volume_id, node_id="node-a"), Code.INVALID_ARGUMENT),
        (
            pb.ControllerPublishVolumeRequest(
                volume_id=str(uuid.uuid4()), node_id="node-a", volume_capability=mount_cap()
            ),
            Code.NOT_FOUND,
        ),
        (
            pb.ControllerPublishVolumeRequest(
                volume_id=volume.volume_id, node_id="node-unknown", volume_capability=mount_cap()
            ),
            Code.NOT_FOUND,
        ),
    ]
    for request_, code in cases:
        assert rpc_error(ctl.stub.ControllerPublishVolume, request_).code() == code, request_
    assert rpc_error(ctl.stub.ControllerUnpublishVolume, pb.ControllerUnpublishVolumeRequest()).code() == (
        Code.INVALID_ARGUMENT
    )
    delete(ctl, volume.volume_id)


def test_publish_is_idempotent_and_single_node(ctl):
    volume = create(ctl)
    context = dict(publish(ctl, volume.volume_id).publish_context)
    assert context["driver_volume_type"] == "local"
    device = context["device_path"]
    assert device.startswith("/dev/loop") and ctl.loop_devices() == [device]
    assert dict(publish(ctl, volume.volume_id).publish_context) == context
    error = rpc_error(publish, ctl, volume.volume_id, "node-a", True)
    assert error.code() == Code.ALREADY_EXISTS
    error = rpc_error(publish, ctl, volume.volume_id, "node-b")
    assert error.code() == Code.FAILED_PRECONDITION
    assert "published to node node-a" in error.details()
    listed = ctl.stub.ListVolumes(pb.ListVolumesRequest()).entries
    assert [list(e.status.published_node_ids) for e in listed if e.volume.volume_id == volume.volume_id] == [["node-a"]]
    unpublish(ctl, volume.volume_id)
    unpublish(ctl, volume.volume_id)  # again: OK
    unpublish(ctl, str(uuid.uuid4()))  # unknown volume: OK
    wait_until(lambda: ctl.loop_devices() == [], 60, "the loop devices to be released")  # udev may hold one
    readonly = dict(publish(ctl, volume.volume_id, "node-b", readonly=True).publish_context)
    assert readonly["access_mode"] == "ro"
    ctl.stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id))  # all nodes
    delete(ctl, volume.volume_id)


# --- ValidateVolumeCapabilities ----------------------------------------------------------------------


def test_validate_volume_capabilities(ctl):
    volume = create(ctl)
    validate = ctl.stub.ValidateVolumeCapabilities
    confirmed = validate(
        pb.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id, volume_capabilities=[mount_cap()])
    )
    assert list(confirmed.confirmed.volume_capabilities) == [mount_cap()]
    refused = validate(
        pb.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id, volume_capabilities=[block_cap()])
    )
    assert not refused.HasField("confirmed") and "created as a mount volume" in refused.message
    refused = validate(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[block_cap(Mode.MULTI_NODE_MULTI_WRITER)]
        )
    )
    assert not refused.HasField("confirmed") and "multiattach" in refused.message
    assert rpc_error(validate, pb.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id)).code() == (
        Code.INVALID_ARGUMENT
    )
    assert (
        rpc_error(
            validate,
            pb.ValidateVolumeCapabilitiesRequest(volume_id=str(uuid.uuid4()), volume_capabilities=[mount_cap()]),
        ).code()
        == Code.NOT_FOUND
    )
    delete(ctl, volume.volume_id)


# --- ListVolumes / GetCapacity -----------------------------------------------------------------------


def test_list_volumes_paginates_in_a_stable_order(ctl):
    made = {create(ctl).volume_id for _ in range(5)}
    seen, token, pages = [], "", 0
    while True:
        page = ctl.stub.ListVolumes(pb.ListVolumesRequest(max_entries=2, starting_token=token))
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        token, pages = page.next_token, pages + 1
        if not token:
            break
    assert made <= set(seen) and len(seen) == len(set(seen)) and pages >= 3
    assert seen == sorted(seen)
    assert rpc_error(ctl.stub.ListVolumes, pb.ListVolumesRequest(starting_token="bogus")).code() == Code.ABORTED
    assert rpc_error(ctl.stub.ListVolumes, pb.ListVolumesRequest(max_entries=-1)).code() == Code.INVALID_ARGUMENT
    for volume_id in made:
        delete(ctl, volume_id)


def test_get_capacity_reports_the_backend_filesystem(tmp_path):
    """The loopback backend's capacity is its filesystem's available space, measured on a tmpfs of its
    own that nothing else on the machine writes to. Cinder's stats carry GiB to two decimals, so the
    figure must match to 0.005 GiB."""
    directory = tmp_path / "pool"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3g", "mbs-capacity-test", str(directory)], check=True)
    try:
        (directory / "taken").write_bytes(b"\0" * (512 << 20))  # so that available != size
        backend = loopback_backend(directory / "loopback")
        controller = ControllerUnderTest(None, backends=[backend])
        try:
            answer = controller.stub.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[mount_cap()]))
            stat = os.statvfs(directory)
        finally:
            controller.close()
    finally:
        subprocess.run(["umount", str(directory)], check=True)
    assert abs(answer.available_capacity - stat.f_bavail * stat.f_frsize) <= 0.005 * GIB
    assert abs(answer.available_capacity - 2.5 * GIB) <= 0.005 * GIB
    assert answer.minimum_volume_size.value == GIB


def test_get_capacity_answers_for_the_capabilities_and_topology_asked(ctl):
    assert ctl.stub.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[mount_cap()])).available_capacity > 0
    unsupported = ctl.stub.GetCapacity(
        pb.GetCapacityRequest(volume_capabilities=[block_cap(Mode.MULTI_NODE_MULTI_WRITER)])
    )
    assert unsupported.available_capacity == 0
    elsewhere = ctl.stub.GetCapacity(
        pb.GetCapacityRequest(accessible_topology=pb.Topology(segments={ZONE_KEY: "zone-b"}))
    )
    assert elsewhere.available_capacity == 0
    here = ctl.stub.GetCapacity(pb.GetCapacityRequest(accessible_topology=pb.Topology(segments={ZONE_KEY: "zone-a"})))
    assert here.available_capacity > 0
    error = rpc_error(ctl.stub.GetCapacity, pb.GetCapacityRequest(parameters={"backend": "nope"}))
    assert error.code() == Code.INVALID_ARGUMENT


# --- snapshots ---------------------------------------------------------------------------------------


def test_snapshot_lifecycle(ctl):
    volume = create(ctl)
    other = create(ctl)
    assert rpc_error(ctl.stub.CreateSnapshot, pb.CreateSnapshotRequest(source_volume_id=volume.volume_id)).code() == (
        Code.INVALID_ARGUMENT
    )
    assert rpc_error(ctl.stub.CreateSnapshot, pb.CreateSnapshotRequest(name="s")).code() == Code.INVALID_ARGUMENT
    assert rpc_error(snapshot, ctl, str(uuid.uuid4())).code() == Code.NOT_FOUND
    name = unique("snap")
    snap = snapshot(ctl, volume.volume_id, name)
    assert snap.ready_to_use and snap.size_bytes == GIB and snap.source_volume_id == volume.volume_id
    assert abs(snap.creation_time.ToSeconds() - time.time()) < 120
    assert snapshot(ctl, volume.volume_id, name) == snap
    assert rpc_error(snapshot, ctl, other.volume_id, name).code() == Code.ALREADY_EXISTS

    second = snapshot(ctl, volume.volume_id)
    by_id = ctl.stub.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=snap.snapshot_id)).entries
    assert [e.snapshot for e in by_id] == [snap]
    by_source = ctl.stub.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=volume.volume_id))
    assert {e.snapshot.snapshot_id for e in by_source.entries} == {snap.snapshot_id, second.snapshot_id}
    first_page = ctl.stub.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=volume.volume_id, max_entries=1))
    assert len(first_page.entries) == 1 and first_page.next_token
    rest = ctl.stub.ListSnapshots(
        pb.ListSnapshotsRequest(source_volume_id=volume.volume_id, starting_token=first_page.next_token)
    )
    assert len(rest.entries) == 1 and not rest.next_token
    assert not ctl.stub.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=str(uuid.uuid4()))).entries

    assert ctl.stub.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot == snap
    assert (
        rpc_error(ctl.stub.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=str(uuid.uuid4()))).code() == Code.NOT_FOUND
    )
    for s in (snap, second, snap):  # the repeat is idempotent
        ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
    assert rpc_error(ctl.stub.DeleteSnapshot, pb.DeleteSnapshotRequest()).code() == Code.INVALID_ARGUMENT
    assert not list(ctl.loopback.glob("snapshot-*"))
    delete(ctl, volume.volume_id)
    delete(ctl, other.volume_id)


# --- ControllerExpandVolume / ControllerGetVolume ---------------------------------------------------


def test_expand_volume(ctl):
    volume = create(ctl, caps=[block_cap()])
    expand = ctl.stub.ControllerExpandVolume
    grown = expand(
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=3 * GIB)
        )
    )
    assert grown.capacity_bytes == 3 * GIB and grown.node_expansion_required
    assert os.path.getsize(ctl.volume_file(volume.volume_id)) == 3 * GIB
    same = expand(
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * GIB)
        )
    )
    assert same.capacity_bytes == 3 * GIB
    shrink = rpc_error(
        expand,
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=GIB, limit_bytes=GIB)
        ),
    )
    assert shrink.code() == Code.OUT_OF_RANGE
    assert (
        rpc_error(expand, pb.ControllerExpandVolumeRequest(volume_id=volume.volume_id)).code() == Code.INVALID_ARGUMENT
    )
    assert (
        rpc_error(
            expand,
            pb.ControllerExpandVolumeRequest(
                volume_id=str(uuid.uuid4()), capacity_range=pb.CapacityRange(required_bytes=GIB)
            ),
        ).code()
        == Code.NOT_FOUND
    )
    delete(ctl, volume.volume_id)


def test_get_volume_reports_publications_and_a_vanished_backend_volume(ctl):
    volume = create(ctl)
    publish(ctl, volume.volume_id, "node-b")
    answer = ctl.stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert answer.volume.volume_id == volume.volume_id
    assert list(answer.status.published_node_ids) == ["node-b"]
    assert not answer.status.volume_condition.abnormal
    unpublish(ctl, volume.volume_id, "node-b")
    ctl.volume_file(volume.volume_id).unlink()  # the storage lost it behind the driver's back
    answer = ctl.stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert answer.status.volume_condition.abnormal
    assert "is missing on backend loop" in answer.status.volume_condition.message
    assert rpc_error(
        ctl.stub.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=str(uuid.uuid4()))
    ).code() == (Code.NOT_FOUND)
    delete(ctl, volume.volume_id)


# --- concurrency -------------------------------------------------------------------------------------


def test_fifty_concurrent_creates_of_one_name_make_one_volume(ctl):
    name = unique()
    before = set(ctl.backend_volume_files())

    def attempt(_):
        try:
            return ctl.stub.CreateVolume(create_request(name)).volume.volume_id
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(attempt, range(50)))
    ids = {r for r in results if isinstance(r, str)}
    assert len(ids) == 1, results
    assert {r for r in results if not isinstance(r, str)} <= {Code.ABORTED}
    assert len(set(ctl.backend_volume_files()) - before) == 1
    delete(ctl, ids.pop())


def test_twenty_distinct_concurrent_creates_all_succeed(ctl):
    with ThreadPoolExecutor(20) as pool:
        volumes = list(pool.map(lambda _: create(ctl), range(20)))
    assert len({v.volume_id for v in volumes}) == 20
    assert all(ctl.volume_file(v.volume_id).exists() for v in volumes)
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda v: delete(ctl, v.volume_id), volumes))
    assert not any(ctl.volume_file(v.volume_id).exists() for v in volumes)


# --- durability and worker failures -----------------------------------------------------------------


def test_a_restart_loses_nothing(ctl):
    volume = create(ctl)
    snap = snapshot(ctl, volume.volume_id)
    context = dict(publish(ctl, volume.volume_id).publish_context)
    ctl.restart()
    listed = {e.volume.volume_id: e for e in ctl.stub.ListVolumes(pb.ListVolumesRequest()).entries}
    assert list(listed[volume.volume_id].status.published_node_ids) == ["node-a"]
    assert ctl.stub.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot == snap
    assert dict(publish(ctl, volume.volume_id).publish_context) == context
    unpublish(ctl, volume.volume_id)
    ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    delete(ctl, volume.volume_id)


def test_a_killed_worker_is_replaced_and_calls_go_on(ctl):
    wait_until(lambda: len(ctl.ready_worker_pids()) == 2, 120, "2 ready workers")
    old = ctl.ready_worker_pids()
    os.kill(old[0], signal.SIGKILL)
    for _ in range(4):
        delete(ctl, create(ctl).volume_id)
    wait_until(
        lambda: old[0] not in ctl.worker_pids() and len(ctl.worker_pids()) == 2, 120, "the killed worker replaced"
    )


@pytest.mark.slow
def test_hung_workers_time_out_with_deadline_exceeded_and_are_replaced():
    ctl = ControllerUnderTest(None, extra={"backend_timeout": 3})
    try:
        wait_until(lambda: len(ctl.ready_worker_pids()) == 2, 120, "2 ready workers")
        hung = ctl.ready_worker_pids()
        for pid in hung:
            os.kill(pid, signal.SIGSTOP)  # backend calls that never return, as with a storage that hangs
        # A hung worker shows itself when a call lands on it: each one costs one call its deadline.
        errors, volume = [], None
        for _ in range(4):
            try:
                volume = create(ctl)
                break
            except grpc.RpcError as exc:
                errors.append(exc)
                # The next call waits for a free worker within its own deadline: let a replacement start
                # first, or on a loaded machine the call may time out waiting rather than on a hung worker.
                wait_until(lambda: set(ctl.ready_worker_pids()) - set(hung), 120, "a replacement worker")
        assert volume is not None, [e.details() for e in errors]
        assert 1 <= len(errors) <= 2
        for error in errors:
            assert error.code() == Code.DEADLINE_EXCEEDED
            assert "took longer than 3s; its worker was replaced" in error.details()
        delete(ctl, volume.volume_id)
        assert set(hung) - set(ctl.worker_pids()), "no hung worker was replaced"
    finally:
        ctl.close()


def test_a_fresh_start_of_several_workers_migrates_once_without_errors():
    ctl = ControllerUnderTest(None, extra={"backend_workers": 4})  # a fresh SQLite file: the schema is created
    try:
        wait_until(lambda: len(ctl.ready_worker_pids()) == 4, 120, "4 ready workers")
        assert " ERROR " not in ctl.driver.log()
    finally:
        ctl.close()


def test_a_signal_to_the_whole_process_group_leaves_the_workers_to_the_drain():
    """Ctrl-C in a terminal signals every process of the group: the workers must not die mid-call (and be
    needlessly replaced) while the front drains; the front stops them when it is done."""
    ctl = ControllerUnderTest(None)
    try:
        wait_until(lambda: len(ctl.ready_worker_pids()) == 2, 120, "2 ready workers")
        workers = ctl.ready_worker_pids()
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert ctl.worker_pids() == workers  # still the same, still running
        delete(ctl, create(ctl).volume_id)
        assert ctl.driver.stop() == 0
        log = ctl.driver.log()
        assert "replaced" not in log and "received SIGTERM: draining" in log
        assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    finally:
        ctl.close()
