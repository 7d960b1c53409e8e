"""The whole flow through gRPC with role ``all`` on the loopback backend: real loop devices, real mkfs,
real mounts. CreateVolume -> ControllerPublish -> NodeStage -> NodePublish -> data -> unpublish/unstage ->
stage/publish again (data kept) -> expand -> stats -> tear down, leaving nothing behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc
from mbs_csi.node.devices import block_device_size
from mbs_csi.node.mountinfo import mounted_device
from testkit.controller import ControllerUnderTest
from testkit.csi_requests import GIB, block_cap, create_request, mount_cap
from testkit.host import CAP_SYS_RESOURCE, REPO, has_capability
from testkit.rpc import rpc_error
from testkit.wait import wait_until

NODE = "node-e2e"


@pytest.fixture(scope="module")
def cluster():
    """One mbs-csi process serving controller and node, as on a single machine."""
    ctl = ControllerUnderTest(None, extra={"role": "all", "node_id": NODE})
    ctl.node = csi_pb2_grpc.NodeStub(ctl.driver.channel)
    yield ctl
    leftovers = ctl.loop_devices()
    ctl.close()
    assert leftovers == []


def mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def wait_published_connector(cluster) -> None:
    """Role all publishes this node's connector properties once its backend workers are up."""
    cluster.driver.wait_logged(f"published connector properties of node {NODE}")


class Volume:
    """Drives one volume through the CSI calls a CO makes."""

    def __init__(self, cluster, cap: pb.VolumeCapability, readonly: bool = False) -> None:
        self.c = cluster
        self.cap = cap
        self.readonly = readonly
        self.id = cluster.stub.CreateVolume(create_request(f"pvc-{uuid.uuid4().hex[:8]}", caps=[cap])).volume.volume_id
        self.staging = cluster.workdir / f"staging-{self.id[:8]}"
        self.target = cluster.workdir / f"pods/{self.id[:8]}/volume"
        self.context: dict[str, str] = {}

    def publish_controller(self) -> None:
        self.context = dict(
            self.c.stub.ControllerPublishVolume(
                pb.ControllerPublishVolumeRequest(
                    volume_id=self.id, node_id=NODE, volume_capability=self.cap, readonly=self.readonly
                )
            ).publish_context
        )

    def stage_request(self, cap: pb.VolumeCapability | None = None) -> pb.NodeStageVolumeRequest:
        return pb.NodeStageVolumeRequest(
            volume_id=self.id,
            publish_context=self.context,
            staging_target_path=str(self.staging),
            volume_capability=cap or self.cap,
        )

    def stage(self) -> None:
        self.c.node.NodeStageVolume(self.stage_request())

    def publish_request(self, target: Path | None = None, readonly: bool | None = None) -> pb.NodePublishVolumeRequest:
        (target or self.target).parent.mkdir(parents=True, exist_ok=True)  # the CO makes the target's parent
        return pb.NodePublishVolumeRequest(
            volume_id=self.id,
            publish_context=self.context,
            staging_target_path=str(self.staging),
            target_path=str(target or self.target),
            volume_capability=self.cap,
            readonly=self.readonly if readonly is None else readonly,
        )

    def publish(self) -> None:
        self.c.node.NodePublishVolume(self.publish_request())

    def unpublish(self) -> None:
        self.c.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=self.id, target_path=str(self.target)))

    def unstage(self) -> None:
        self.c.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=self.id, staging_target_path=str(self.staging))
        )

    def expand(self, gib: int) -> int:
        self.c.stub.ControllerExpandVolume(
            pb.ControllerExpandVolumeRequest(
                volume_id=self.id, capacity_range=pb.CapacityRange(required_bytes=gib * GIB)
            )
        )
        return self.c.node.NodeExpandVolume(
            pb.NodeExpandVolumeRequest(
                volume_id=self.id,
                volume_path=str(self.target),
                capacity_range=pb.CapacityRange(required_bytes=gib * GIB),
                staging_target_path=str(self.staging),
                volume_capability=self.cap,
            )
        ).capacity_bytes

    def stats(self) -> pb.NodeGetVolumeStatsResponse:
        return self.c.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(volume_id=self.id, volume_path=str(self.target))
        )

    def tear_down(self) -> None:
        self.unpublish()
        self.unstage()
        self.c.stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=self.id, node_id=NODE))
        self.c.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=self.id))


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_filesystem_volume_life(cluster, fs_type):
    wait_published_connector(cluster)
    vol = Volume(cluster, mount_cap(fs_type))
    vol.publish_controller()
    for _ in range(2):  # every call twice: the repeat changes nothing
        vol.stage()
    for _ in range(2):
        vol.publish()
    assert mounted(vol.staging) and mounted(vol.target)
    (vol.target / "hello.txt").write_text("kept across unstage")
    vol.unpublish()
    vol.unstage()
    assert not mounted(vol.target) and not mounted(vol.staging) and not vol.target.exists()
    vol.stage()
    vol.publish()
    assert (vol.target / "hello.txt").read_text() == "kept across unstage"  # staged again: not reformatted

    before = vol.stats()
    if fs_type == "ext4" and not has_capability(CAP_SYS_RESOURCE):
        # This sandbox drops CAP_SYS_RESOURCE, which online ext4 growth needs (a privileged node pod has
        # it): the call must fail with a message that says so, and the volume must keep working.
        error = rpc_error(vol.expand, 2)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "CAP_SYS_RESOURCE" in error.details()
        assert (vol.target / "hello.txt").read_text() == "kept across unstage"
        vol.tear_down()
        return
    assert vol.expand(2) == 2 * GIB
    after = vol.stats()
    bytes_before = next(u for u in before.usage if u.unit == pb.VolumeUsage.BYTES)
    bytes_after = next(u for u in after.usage if u.unit == pb.VolumeUsage.BYTES)
    assert bytes_after.total > bytes_before.total + GIB // 2
    assert not after.volume_condition.abnormal

    for _ in range(2):
        vol.tear_down()
    assert not cluster.volume_file(vol.id).exists()
    assert not mounted(vol.staging) and not mounted(vol.target)


def test_block_volume_life(cluster):
    wait_published_connector(cluster)
    vol = Volume(cluster, block_cap())
    vol.publish_controller()
    vol.stage()
    vol.publish()
    with open(vol.target, "r+b") as device:  # the pod sees the raw device at the target file
        device.write(b"raw block data")
    vol.unpublish()
    vol.unstage()
    vol.stage()
    vol.publish()
    with open(vol.target, "rb") as device:
        assert device.read(14) == b"raw block data"
    assert vol.expand(2) == 2 * GIB
    assert next(u for u in vol.stats().usage).total == 2 * GIB
    vol.tear_down()
    assert not cluster.volume_file(vol.id).exists()


def test_a_read_only_block_publish_refuses_writes_and_leaves_other_publishes_writable(cluster):
    wait_published_connector(cluster)
    vol = Volume(cluster, block_cap())
    vol.publish_controller()
    vol.stage()
    vol.publish()
    with open(vol.target, "r+b") as device:
        device.write(b"written before")
    reader = cluster.workdir / f"pods/{vol.id[:8]}-reader/volume"
    read_only = vol.publish_request(reader, readonly=True)
    for _ in range(2):  # a repeat finds the same view
        cluster.node.NodePublishVolume(read_only)
    view = mounted_device(str(reader))
    assert view and view != mounted_device(str(vol.target))
    with pytest.raises(OSError) as caught, open(reader, "r+b", buffering=0) as device:
        device.write(b"overwritten")  # the kernel refuses the write (older ones refuse the open)
    assert caught.value.errno in (errno.EPERM, errno.EROFS)
    with open(reader, "rb") as device:
        assert device.read(14) == b"written before"
    with open(vol.target, "r+b") as device:  # the read-write publish is unchanged
        device.write(b"written after!")
    with open(reader, "rb") as device:
        assert device.read(14) == b"written after!"

    assert vol.expand(2) == 2 * GIB
    assert block_device_size(view) == 2 * GIB  # the view follows the device
    cluster.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol.id, target_path=str(reader)))
    vol.tear_down()
    assert not Path(f"/sys/block/{Path(view).name}/loop/backing_file").exists()  # detached at unstage


@pytest.mark.parametrize("cap", [mount_cap("ext4"), block_cap()], ids=["mount", "block"])
def test_a_volume_the_controller_published_read_only_is_read_only_in_every_publish(cluster, cap):
    wait_published_connector(cluster)
    vol = Volume(cluster, cap, readonly=True)
    vol.publish_controller()
    assert vol.context["access_mode"] == "ro"
    vol.stage()
    vol.readonly = False  # the pod asks for nothing: the controller's publish decides
    vol.publish()
    with pytest.raises(OSError) as caught:
        if cap.HasField("mount"):
            (vol.target / "nope.txt").write_text("x")
        else:
            with open(vol.target, "r+b", buffering=0) as device:
                device.write(b"overwritten")
    assert caught.value.errno in (errno.EROFS, errno.EPERM)
    vol.tear_down()


def test_read_only_publish(cluster):
    wait_published_connector(cluster)
    vol = Volume(cluster, mount_cap("ext4"), readonly=True)
    vol.publish_controller()
    vol.stage()
    vol.publish()
    with pytest.raises(OSError) as caught:
        (vol.target / "nope.txt").write_text("x")
    assert caught.value.errno == 30  # EROFS
    vol.tear_down()


def test_node_arguments_and_status_codes(cluster):
    node = cluster.node
    cases = [
        (
            node.NodeStageVolume,
            pb.NodeStageVolumeRequest(
                staging_target_path="/x", volume_capability=mount_cap(), publish_context={"a": "b"}
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            node.NodeStageVolume,
            pb.NodeStageVolumeRequest(volume_id="v", volume_capability=mount_cap(), publish_context={"a": "b"}),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            node.NodeStageVolume,
            pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x", publish_context={"a": "b"}),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            node.NodeStageVolume,
            pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x", volume_capability=mount_cap()),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            node.NodePublishVolume,
            pb.NodePublishVolumeRequest(
                volume_id="v", staging_target_path="/x", target_path="/y", volume_capability=mount_cap()
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id="v"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            node.NodeUnstageVolume,
            pb.NodeUnstageVolumeRequest(staging_target_path="/x"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path="/y"),
            grpc.StatusCode.NOT_FOUND,
        ),
        (node.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id="v", volume_path="/y"), grpc.StatusCode.NOT_FOUND),
    ]
    for call, request, code in cases:
        assert rpc_error(call, request).code() == code, request
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id="unknown", staging_target_path="/x"))  # OK
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="unknown", target_path="/nonexistent"))  # OK
    info = node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == NODE
    caps = {c.rpc.type for c in node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities}
    RPC = pb.NodeServiceCapability.RPC
    assert {
        RPC.STAGE_UNSTAGE_VOLUME,
        RPC.GET_VOLUME_STATS,
        RPC.EXPAND_VOLUME,
        RPC.VOLUME_CONDITION,
        RPC.VOLUME_MOUNT_GROUP,
    } <= caps


def test_the_node_role_never_imports_cinder(tmp_path):
    script = (
        "import sys\n"
        "from mbs_csi import config\n"
        "from mbs_csi.server import Server\n"
        f"settings = config.load_settings(env={{}}, flags={{'role': 'node', 'state_dir': '{tmp_path}/state', "
        f"'endpoint': 'unix://{tmp_path}/csi.sock'}})\n"
        "server = Server(settings)\n"
        "server.start()\n"
        "server.stop(0)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cinder', 'cinderlib')))\n"
        # os-brick imports eventlet (through oslo.privsep); it must never monkey-patch the gRPC process.
        "import eventlet.patcher\n"
        "print(eventlet.patcher.is_monkey_patched('socket') or eventlet.patcher.is_monkey_patched('thread'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("MBS_CSI")},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-2:] == ["[]", "False"]


def test_restaging_incompatibly_or_elsewhere_and_a_foreign_mount_at_the_target(cluster):
    wait_published_connector(cluster)
    vol = Volume(cluster, mount_cap("ext4"))
    vol.publish_controller()
    vol.stage()
    other = vol.stage_request(mount_cap("xfs"))
    assert rpc_error(cluster.node.NodeStageVolume, other).code() == grpc.StatusCode.ALREADY_EXISTS
    other.staging_target_path, other.volume_capability.mount.fs_type = str(vol.staging) + "-2", "ext4"
    error = rpc_error(cluster.node.NodeStageVolume, other)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "already staged at" in error.details()

    vol.target.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(vol.target)], check=True)
    try:
        assert rpc_error(vol.publish).code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        subprocess.run(["umount", str(vol.target)], check=True)
    vol.tear_down()


def test_a_filesystem_of_another_type_is_never_reformatted(cluster):
    """Staging mounts first and probes only when that fails: a device holding ext4, staged as xfs, is
    refused without a write, and still mounts as ext4 with its data afterwards."""
    wait_published_connector(cluster)
    vol = Volume(cluster, mount_cap("ext4"))
    vol.publish_controller()
    vol.stage()
    vol.publish()
    (vol.target / "kept").write_text("data")
    vol.unpublish()
    vol.unstage()

    as_xfs = vol.stage_request(mount_cap("xfs"))
    error = rpc_error(cluster.node.NodeStageVolume, as_xfs)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already holds a ext4 filesystem, not xfs; refusing to reformat it" in error.details()
    assert not mounted(vol.staging)
    vol.stage()
    vol.publish()
    assert (vol.target / "kept").read_text() == "data"
    vol.tear_down()


def test_a_device_with_only_a_partition_table_is_refused_untouched(cluster):
    """No filesystem, but not blank either: staging refuses it and writes nothing."""
    wait_published_connector(cluster)
    vol = Volume(cluster, mount_cap("ext4"))
    vol.publish_controller()
    mbr = bytearray(512)
    mbr[446 + 4] = 0x83  # one Linux partition, sectors 2048..6143
    mbr[446 + 8 : 446 + 16] = (2048).to_bytes(4, "little") + (4096).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    device = vol.context["device_path"]
    with open(device, "r+b") as f:
        f.write(mbr)
    error = rpc_error(vol.stage)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "holds no filesystem but is not blank either" in error.details()
    assert not mounted(vol.staging)
    with open(device, "rb") as f:
        assert f.read(512) == bytes(mbr) and f.read(1 << 20) == bytes(1 << 20)  # nothing else written
    cluster.stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.id, node_id=NODE))
    cluster.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id))


def test_volume_mount_group_gives_the_pod_group_write_access(cluster):
    wait_published_connector(cluster)
    cap = mount_cap("ext4")
    cap.mount.volume_mount_group = "4321"
    vol = Volume(cluster, cap)
    vol.publish_controller()
    vol.stage()
    vol.publish()
    info = vol.target.stat()
    assert info.st_gid == 4321 and info.st_mode & 0o2070 == 0o2070  # setgid, group rwx
    vol.tear_down()


def test_a_restarted_node_plugin_still_unstages_cleanly(cluster):
    wait_published_connector(cluster)
    vol = Volume(cluster, mount_cap("xfs"))
    vol.publish_controller()
    vol.stage()
    vol.publish()
    listed = subprocess.run(
        [sys.executable, "-m", "mbs_csi", "node", "attachments", "--json", "--state-dir", str(cluster.state)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    shown = json.loads(listed.stdout)
    [row] = [r for r in shown["attachments"] if r["volume_id"] == vol.id]
    assert shown["last_start"]["at"]  # the node plugin started with this store
    assert row["exists"] is True and row["fs_type"] == "xfs" and row["device_path"].startswith("/dev/loop")
    cluster.restart()  # state comes back from the attachment store, not memory
    vol.c.node = cluster.node = csi_pb2_grpc.NodeStub(cluster.driver.channel)
    vol.tear_down()
    assert not mounted(vol.staging) and not mounted(vol.target)
    wait_until(lambda: cluster.loop_devices() == [], 60, "the loop devices to be released")  # udev may hold one


def test_stats_report_a_vanished_mount_and_a_vanished_device(cluster):
    wait_published_connector(cluster)
    vol = Volume(cluster, mount_cap("ext4"))
    vol.publish_controller()
    vol.stage()
    vol.publish()
    assert not vol.stats().volume_condition.abnormal
    subprocess.run(["umount", str(vol.target)], check=True)
    subprocess.run(["umount", str(vol.staging)], check=True)  # behind the driver's back
    condition = vol.stats().volume_condition
    assert condition.abnormal and "no longer has" in condition.message
    listed = subprocess.run(
        [sys.executable, "-m", "mbs_csi", "node", "attachments", "--state-dir", str(cluster.state)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"{vol.id}" in listed.stdout and "exists: no" in listed.stdout
    vol.tear_down()

    block = Volume(cluster, block_cap())
    block.publish_controller()
    block.stage()
    subprocess.run(["losetup", "-d", block.context["device_path"]], check=True)  # the device goes away
    condition = block.c.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=block.id, volume_path=str(block.staging))
    ).volume_condition
    assert condition.abnormal and "is gone" in condition.message
    block.tear_down()
