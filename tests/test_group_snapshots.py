"""The GroupController (volume group snapshots) through the real ``mbs-csi`` process and real cinderlib: on
the loopback backend (SQLite and PostgreSQL) and on the real Ceph cluster through Cinder's stock RBD
driver. Neither driver takes consistent group snapshots (neither reports
``consistent_group_snapshot_enabled``), so a group snapshot needs ``consistency: loose`` on both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc
from testkit import audit, faults
from testkit.audit import Audit
from testkit.controller import ControllerUnderTest, controller_on, unique
from testkit.csi_requests import GIB, create_request
from testkit.rpc import rpc_error
from testkit.wait import wait_until
from tests.test_controller_ceph import rbd_backend

Code = grpc.StatusCode
LOOSE = {"consistency": "loose"}
JOURNAL = "group-calls.jsonl"  # tests/group_driver.py's journal (not imported here: it loads cinder)


class Groups:
    """A controller under test, its GroupController stub, and what its storage holds."""

    def __init__(self, ctl: ControllerUnderTest, ceph=None) -> None:
        self.ctl = ctl
        self.stub = ctl.stub
        self.groups = csi_pb2_grpc.GroupControllerStub(ctl.driver.channel)
        self.ceph = ceph

    def volumes(self, count: int) -> list[str]:
        return [self.stub.CreateVolume(create_request(unique(), required=GIB)).volume.volume_id for _ in range(count)]

    def create(self, name: str, volume_ids: list[str], parameters: dict[str, str] | None = None):
        request = pb.CreateVolumeGroupSnapshotRequest(
            name=name, source_volume_ids=volume_ids, parameters=LOOSE if parameters is None else parameters
        )
        return self.groups.CreateVolumeGroupSnapshot(request).group_snapshot

    def get(self, group_snapshot_id: str, snapshot_ids: list[str]):
        request = pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=group_snapshot_id, snapshot_ids=snapshot_ids)
        return self.groups.GetVolumeGroupSnapshot(request).group_snapshot

    def delete(self, group_snapshot_id: str, snapshot_ids: list[str]) -> None:
        request = pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group_snapshot_id, snapshot_ids=snapshot_ids)
        self.groups.DeleteVolumeGroupSnapshot(request)

    def listed(self, snapshot_id: str) -> list[pb.Snapshot]:
        entries = self.stub.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=snapshot_id)).entries
        return [e.snapshot for e in entries]

    def storage_snapshots(self, volume_id: str) -> list[str]:
        """The snapshots the storage holds of ``volume_id``: RBD snapshots of its image (Ceph), or the
        loopback's snapshot files the controller lists as of that volume, and any file it does not list (a
        leak, whatever its volume)."""
        if self.ceph is None:
            return sorted(p.name for p in self.ctl.loopback.glob("snapshot-*") if self._of(p.name, volume_id))
        out = self.ceph.rbd("snap", "ls", "--format", "json", f"{self.ceph.pool}/volume-{volume_id}")
        return sorted(s["name"] for s in json.loads(out))

    def _of(self, snapshot_file: str, volume_id: str) -> bool:
        listed = self.listed(snapshot_file.removeprefix("snapshot-"))
        return not listed or listed[0].source_volume_id == volume_id

    def delete_volumes(self, volume_ids: list[str]) -> None:
        for volume_id in volume_ids:
            self.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


@pytest.fixture(scope="module", params=["sqlite", "postgresql", pytest.param("ceph", marks=pytest.mark.slow)])
def groups(request) -> Iterator[Groups]:
    if request.param == "ceph":
        ceph = request.getfixturevalue("ceph")
        ctl = ControllerUnderTest(None, backends=[rbd_backend(ceph)])
        try:
            yield Groups(ctl, ceph)
        finally:
            ctl.close()
        return
    with controller_on(request, ()) as ctl:
        yield Groups(ctl)


@pytest.fixture(scope="module", params=["sqlite"])
def loop_groups(request) -> Iterator[Groups]:
    """The loopback backend on SQLite, for the checks that do not depend on the storage."""
    with controller_on(request, ()) as ctl:
        yield Groups(ctl)


# --- capabilities ------------------------------------------------------------------------------------


def test_the_group_controller_service_and_its_rpcs_are_advertised(loop_groups):
    identity = csi_pb2_grpc.IdentityStub(loop_groups.ctl.driver.channel)
    services = [c.service.type for c in identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities]
    assert pb.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in services
    caps = loop_groups.groups.GroupControllerGetCapabilities(pb.GroupControllerGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == [
        pb.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]


# --- the life of a group snapshot, on each backend --------------------------------------------------


def test_a_backend_without_consistent_group_snapshots_needs_loose_consistency(groups):
    volumes = groups.volumes(2)
    name = unique("group")
    for parameters in ({}, {"consistency": "strict"}):
        refused = rpc_error(groups.create, name, volumes, parameters)
        assert refused.code() == Code.FAILED_PRECONDITION and "consistency: loose" in refused.details()
    assert all(groups.storage_snapshots(v) == [] for v in volumes)  # nothing taken, nothing recorded
    taken = groups.create(name, volumes, {"consistency": "loose"})
    assert taken.ready_to_use and len(taken.snapshots) == 2
    groups.delete(taken.group_snapshot_id, [s.snapshot_id for s in taken.snapshots])
    groups.delete_volumes(volumes)


def test_group_snapshot_create_get_restore_and_delete(groups):
    volumes = groups.volumes(3)
    name = unique("group")
    taken = groups.create(name, volumes)
    members = {s.source_volume_id: s for s in taken.snapshots}
    assert taken.group_snapshot_id and taken.ready_to_use and taken.creation_time.seconds > 0
    assert sorted(members) == sorted(volumes)
    member_ids = sorted(s.snapshot_id for s in taken.snapshots)
    for volume_id, member in members.items():
        assert member.group_snapshot_id == taken.group_snapshot_id
        assert member.ready_to_use and member.size_bytes == GIB
        assert len(groups.storage_snapshots(volume_id)) == 1  # each member is on the storage
        # every member is a normal CSI snapshot: listed and fetched with its group's id
        assert list(groups.listed(member.snapshot_id)) == [member]
        got = groups.stub.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=member.snapshot_id)).snapshot
        assert got == member

    # the same request again: the same group snapshot (idempotent), nothing more on the storage
    again = groups.create(name, list(reversed(volumes)))
    assert again.group_snapshot_id == taken.group_snapshot_id
    assert sorted(s.snapshot_id for s in again.snapshots) == member_ids
    assert all(len(groups.storage_snapshots(v)) == 1 for v in volumes)
    # the same name for other volumes
    other = rpc_error(groups.create, name, volumes[:2])
    assert other.code() == Code.ALREADY_EXISTS and taken.group_snapshot_id in other.details()

    fetched = groups.get(taken.group_snapshot_id, member_ids)
    assert fetched.group_snapshot_id == taken.group_snapshot_id and fetched.ready_to_use
    assert sorted(fetched.snapshots, key=lambda s: s.snapshot_id) == sorted(
        taken.snapshots, key=lambda s: s.snapshot_id
    )
    assert rpc_error(groups.get, taken.group_snapshot_id, member_ids[:2]).code() == Code.INVALID_ARGUMENT

    # restore a member into a new volume
    member = members[volumes[1]]
    restored = groups.stub.CreateVolume(create_request(unique(), required=GIB, snapshot=member.snapshot_id)).volume
    assert restored.content_source.snapshot.snapshot_id == member.snapshot_id and restored.capacity_bytes == GIB

    # a member goes with its group, and holds its volume
    assert rpc_error(groups.stub.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=member.snapshot_id)).code() == (
        Code.FAILED_PRECONDITION
    )
    assert rpc_error(groups.stub.DeleteVolume, pb.DeleteVolumeRequest(volume_id=volumes[0])).code() == (
        Code.FAILED_PRECONDITION
    )
    # the members named must be the group's
    wrong = rpc_error(groups.delete, taken.group_snapshot_id, [*member_ids[:2], "not-a-member"])
    assert wrong.code() == Code.INVALID_ARGUMENT
    assert groups.get(taken.group_snapshot_id, member_ids).ready_to_use  # still all there

    groups.delete(taken.group_snapshot_id, member_ids)
    assert all(groups.storage_snapshots(v) == [] for v in volumes)
    assert all(groups.listed(i) == [] for i in member_ids)
    assert rpc_error(groups.get, taken.group_snapshot_id, member_ids).code() == Code.NOT_FOUND
    groups.delete(taken.group_snapshot_id, member_ids)  # deleted already: OK
    # the restored volume does not depend on the group snapshot
    groups.delete_volumes([*volumes, restored.volume_id])
    if groups.ceph is not None:
        assert not [i for i in groups.ceph.images() if any(v in i for v in [*volumes, restored.volume_id])]
    else:
        assert groups.ctl.backend_volume_files() == []


def test_a_restored_member_holds_its_volume_data_as_of_the_group_snapshot(loop_groups):
    volumes = loop_groups.volumes(2)
    for index, volume_id in enumerate(volumes):
        with loop_groups.ctl.volume_file(volume_id).open("r+b") as file:
            file.write(bytes([65 + index]) * 4096)
    taken = loop_groups.create(unique("group"), volumes)
    for volume_id in volumes:
        with loop_groups.ctl.volume_file(volume_id).open("r+b") as file:
            file.write(b"\0" * 4096)  # changed after the group snapshot
    member = next(s for s in taken.snapshots if s.source_volume_id == volumes[1])
    restored = loop_groups.stub.CreateVolume(create_request(unique(), snapshot=member.snapshot_id)).volume
    assert loop_groups.ctl.volume_file(restored.volume_id).read_bytes()[:4096] == b"B" * 4096
    loop_groups.delete(taken.group_snapshot_id, [s.snapshot_id for s in taken.snapshots])
    loop_groups.delete_volumes([*volumes, restored.volume_id])


# --- argument checks ---------------------------------------------------------------------------------


def test_group_snapshot_argument_checks(loop_groups):
    volumes = loop_groups.volumes(2)
    long_id = "v" * 129
    invalid = [
        (loop_groups.create, ("", volumes)),
        (loop_groups.create, (unique("group"), [])),
        (loop_groups.create, (unique("group"), [volumes[0], volumes[0]])),
        (loop_groups.create, (unique("group"), [volumes[0], ""])),
        (loop_groups.create, (unique("group"), [volumes[0], long_id])),
        (loop_groups.create, ("g" * 129, volumes)),
        (loop_groups.create, (unique("group"), volumes, {"consistency": "sometimes"})),
        (loop_groups.create, (unique("group"), volumes, {"consistency": "loose", "backend": "loop"})),
        (loop_groups.get, ("", ["x"])),
        (loop_groups.get, ("some-id", [])),
        (loop_groups.delete, ("", ["x"])),
        (loop_groups.delete, ("some-id", [])),
        (loop_groups.delete, ("some-id", [long_id])),
    ]
    for call, args in invalid:
        assert rpc_error(call, *args).code() == Code.INVALID_ARGUMENT, args
    assert rpc_error(loop_groups.create, unique("group"), [volumes[0], "no-such-volume"]).code() == Code.NOT_FOUND
    assert rpc_error(loop_groups.get, "no-such-group", ["x"]).code() == Code.NOT_FOUND
    loop_groups.delete("no-such-group", ["x"])  # nothing to delete: OK
    # the Kubernetes keys the snapshotter may add are accepted
    taken = loop_groups.create(unique("group"), volumes, {**LOOSE, "csi.storage.k8s.io/group-snapshot/name": "x"})
    loop_groups.delete(taken.group_snapshot_id, [s.snapshot_id for s in taken.snapshots])
    loop_groups.delete_volumes(volumes)
    assert loop_groups.ctl.backend_volume_files() == []


# --- kill -9 in the middle of a group snapshot -------------------------------------------------------

FILLED_BYTES = 200 * 1024**2  # written in each source volume, so that each member copy takes a moment
RETRY_TIMEOUT = 120.0


@pytest.fixture
def fault_ctl() -> Iterator[ControllerUnderTest]:
    ctl = ControllerUnderTest(None, extra={"backend_workers": 2, "backend_timeout": 60, "grace_period": 5})
    try:
        yield ctl
    finally:
        ctl.close()


def _retried(call, *args):
    """``call`` repeated, as the CO does, while the controller restarts or replaces a worker."""

    def attempt():
        try:
            return call(*args)
        except grpc.RpcError as exc:
            if exc.code() in (Code.UNAVAILABLE, Code.ABORTED, Code.INTERNAL, Code.DEADLINE_EXCEEDED):
                return None
            raise

    return wait_until(attempt, RETRY_TIMEOUT, f"{call.__name__} to succeed", interval=0.5)


@pytest.mark.parametrize("victim", ["worker", "front"])
def test_a_group_snapshot_cut_short_by_a_kill_is_finished_by_its_retry_and_leaks_nothing(fault_ctl, victim):
    ctl = fault_ctl
    groups = Groups(ctl)
    volumes = groups.volumes(3)
    for volume_id in volumes:
        with ctl.volume_file(volume_id).open("r+b") as file:
            for _ in range(FILLED_BYTES // (4 * 1024**2)):
                file.write(b"\x5a" * 4 * 1024**2)
    name = unique("group")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(groups.create, name, volumes)
        # a member on the storage already and the next one being copied: the group is half taken
        copying = wait_until(
            lambda: list(ctl.loopback.glob("snapshot-*")) and faults.copying_workers(ctl), 60, "a member copy"
        )
        if victim == "worker":
            faults.kill(copying[0])
        else:
            killed = faults.kill_front(ctl)
        failed = first.exception(timeout=RETRY_TIMEOUT)
    findings = Audit()
    if victim == "front":
        assert isinstance(failed, grpc.RpcError)
        faults.restart(ctl, killed, findings, 1)
        groups = Groups(ctl)
        # what the kill left: a group snapshot recorded as being made, and part of it on the storage
        left = audit.live_rows(ctl.state / "mbs-csi.sqlite")
        assert [r for r in left if r.startswith("group_snapshots") and "'creating'" in r], left
    # after a worker's death the pool tries the call once more on another worker: that is the retry then
    taken = first.result() if failed is None else _retried(groups.create, name, volumes)
    assert "removing leftover group snapshot" in ctl.driver.log()
    assert sorted(s.source_volume_id for s in taken.snapshots) == sorted(volumes) and taken.ready_to_use
    member_ids = sorted(s.snapshot_id for s in taken.snapshots)
    # the killed attempt's snapshots are gone, from the storage and the database: only the retry's are left
    assert sorted(p.name for p in ctl.loopback.glob("snapshot-*")) == sorted(f"snapshot-{i}" for i in member_ids)
    rows = audit.live_rows(ctl.state / "mbs-csi.sqlite")
    assert len([r for r in rows if r.startswith("group_snapshots")]) == 1
    assert len([r for r in rows if r.startswith("snapshots ")]) == 3

    groups.delete(taken.group_snapshot_id, member_ids)
    groups.delete_volumes(volumes)
    ctl.driver.stop()
    findings.orphans(ctl.state / "mbs-csi.sqlite", ctl.loopback, ctl.workdir)
    assert not findings.failed_checks(), findings.report()


# --- a driver with group snapshots of its own --------------------------------------------------------


@pytest.fixture(scope="module")
def group_driver_ctl() -> Iterator[Groups]:
    ctl = ControllerUnderTest(None)
    try:
        settings = yaml.safe_load(ctl.config_path.read_text())
        settings["backends"][0]["volume_driver"] = "tests.group_driver.GroupLoopbackDriver"
        ctl.config_path.write_text(yaml.safe_dump(settings))
        ctl.restart()
        yield Groups(ctl)
    finally:
        ctl.close()


def test_a_driver_with_its_own_group_snapshots_is_used_and_needs_no_loose_consistency(group_driver_ctl):
    groups, ctl = group_driver_ctl, group_driver_ctl.ctl
    volumes = groups.volumes(2)
    taken = groups.create(unique("group"), volumes, {})  # strict: the driver reports consistent group snapshots
    member_ids = sorted(s.snapshot_id for s in taken.snapshots)
    assert taken.ready_to_use and sorted(s.source_volume_id for s in taken.snapshots) == sorted(volumes)
    groups.delete(taken.group_snapshot_id, member_ids)
    groups.delete_volumes(volumes)
    calls = [json.loads(line) for line in (ctl.state / JOURNAL).read_text().splitlines()]
    assert [c["call"] for c in calls] == [
        "create_group",
        "update_group",
        "create_group_snapshot",
        "delete_group_snapshot",
        "delete_group",
    ]
    assert calls[1]["add"] == sorted(volumes) and calls[2]["group_snapshot"] == taken.group_snapshot_id
    assert calls[3]["snapshots"] == 2 and calls[4]["volumes"] == 0  # the group's volumes are never deleted
    assert ctl.backend_volume_files() == [] and list(ctl.loopback.glob("snapshot-*")) == []
