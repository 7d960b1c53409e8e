"""The node plugin attacked as crafted requests would: it must act only on what it made.

The Node service runs in this process over a real attachment store, real loop devices (``local``
connections, as the loopback backend gives) and real mounts, next to a *canary tree*: files, empty and
full directories, symbolic links, a tmpfs mount, a foreign loop device with a filesystem mounted, and
another volume the driver staged. Every crafted call must answer a documented code and leave the
canary tree exactly as it was (content, kinds, link targets, mounts, device bytes).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from csi import csi_pb2 as pb
from mbs_csi.config import Settings
from mbs_csi.interceptor import to_status
from mbs_csi.node import brick
from mbs_csi.node.attachments import last_start, list_attachments, render
from mbs_csi.node.mountinfo import mounted_device, read_mountinfo
from mbs_csi.node.service import NodeService
from mbs_csi.node.store import AttachmentStore
from testkit.csi_requests import Mode, block_cap, mount_cap
from testkit.host import short_tmpdir
from testkit.loop import NODE_IN_PROCESS, attach, detach, sparse_file

pytestmark = NODE_IN_PROCESS

MIB = 1024**2
OK = grpc.StatusCode.OK


def call(method: Callable[[Any, Any], Any], request: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and message the server would answer, as its interceptor maps what the handler raises."""
    try:
        method(request, None)
    except Exception as exc:
        code, message = to_status(exc, "test")
        assert "Traceback" not in message
        return code, message
    return OK, ""


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


@dataclass
class Volume:
    id: str
    device: str
    staging: str
    cap: pb.VolumeCapability

    @property
    def context(self) -> dict[str, str]:
        return {"driver_volume_type": "local", "device_path": self.device}

    def stage_request(self) -> pb.NodeStageVolumeRequest:
        return pb.NodeStageVolumeRequest(
            volume_id=self.id,
            staging_target_path=self.staging,
            volume_capability=self.cap,
            publish_context=self.context,
        )

    def publish_request(self, target: str, cap: pb.VolumeCapability | None = None, readonly: bool = False):
        return pb.NodePublishVolumeRequest(
            volume_id=self.id,
            staging_target_path=self.staging,
            target_path=target,
            volume_capability=cap or self.cap,
            readonly=readonly,
            publish_context=self.context,
        )

    def unpublish_request(self, target: str) -> pb.NodeUnpublishVolumeRequest:
        return pb.NodeUnpublishVolumeRequest(volume_id=self.id, target_path=target)

    def stats_request(self, path: str) -> pb.NodeGetVolumeStatsRequest:
        return pb.NodeGetVolumeStatsRequest(volume_id=self.id, volume_path=path)


class Host:
    """A Node service in this process, its workdir, and the loop devices and mounts made for a test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = AttachmentStore.in_state_dir(root / "state")
        settings = cast(Settings, SimpleNamespace(node_id="node-safety", topology={}, max_volumes_per_node=0))
        self.node = NodeService(settings, self.store)
        self.devices: list[str] = []
        (root / "pods").mkdir()

    def restart(self) -> None:
        """A node plugin started again on the same state directory (what it did before stopping is on disk)."""
        self.store.close()
        self.store = AttachmentStore.in_state_dir(self.root / "state")
        self.node = NodeService(self.node.settings, self.store)

    def loop(self, name: str, size: int = 64 * MIB) -> str:
        device = attach(sparse_file(self.root / name, size))
        self.devices.append(device)
        return device

    def volume(self, name: str, cap: pb.VolumeCapability, stage: bool = True) -> Volume:
        volume = Volume(name, self.loop(f"{name}.img"), str(self.root / f"staging-{name}"), cap)
        if stage:
            assert call(self.node.NodeStageVolume, volume.stage_request()) == (OK, "")
        return volume

    def target(self, name: str) -> str:
        """A target path whose parent exists, as the CO makes it."""
        parent = self.root / "pods" / name
        parent.mkdir(exist_ok=True)
        return str(parent / "volume")

    def close(self) -> None:
        prefix = f"{self.root}/"
        for entry in reversed(read_mountinfo()):
            if entry.mount_point.startswith(prefix):
                subprocess.run(["umount", "-l", entry.mount_point], check=False, timeout=60)
        for device in self.devices:
            for view in readonly_views(device):
                detach(view)
            detach(device)
        self.store.close()


def readonly_views(device: str) -> list[str]:
    from mbs_csi.node import readonly_block

    return readonly_block.views(device)


@pytest.fixture(scope="module", autouse=True)
def privileges(tmp_path_factory: pytest.TempPathFactory) -> None:
    brick.setup_privileges(lock_path=str(tmp_path_factory.mktemp("brick-locks")))


@pytest.fixture
def host() -> Iterator[Host]:
    root = short_tmpdir("mbs-safety-")
    made = Host(root)
    try:
        yield made
    finally:
        made.close()
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False, timeout=60)


# --- the canary tree ---------------------------------------------------------------------------------


@dataclass
class Canary:
    root: Path
    paths: dict[str, str]  # what each canary is -> its path
    foreign_device: str  # a loop device holding data, mounted nowhere
    foreign_mounted: str  # the loop device of the foreign-mount
    data_file: Path


def plant_canaries(host: Host) -> Canary:
    root = host.root / "canary"
    root.mkdir()
    (root / "file").write_text("someone's data")
    (root / "empty-dir").mkdir()
    (root / "full-dir").mkdir()
    (root / "full-dir" / "inside").write_text("someone's file in a directory")
    (root / "link-to-dir").symlink_to(root / "full-dir")
    (root / "link-to-file").symlink_to(root / "file")
    (root / "dangling-link").symlink_to(root / "nowhere")
    (root / "tmpfs").mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=1m", "canary", str(root / "tmpfs"))
    (root / "tmpfs" / "kept").write_text("in memory")
    mounted = host.loop("foreign-fs.img", 32 * MIB)
    run("mkfs.ext4", "-q", "-F", mounted)
    (root / "foreign-mount").mkdir()
    run("mount", mounted, str(root / "foreign-mount"))
    (root / "foreign-mount" / "precious").write_text("on a foreign loop device")
    data_file = root / "data-file"
    data_file.write_bytes(os.urandom(16 * MIB))
    raw = host.loop("foreign-raw.img", 16 * MIB)  # someone's data, no filesystem signature
    with open(raw, "r+b") as device:
        device.write(os.urandom(16 * MIB))
    paths = {p.name: str(p) for p in root.iterdir()}
    return Canary(root, paths, raw, mounted, data_file)


def digest(path: str, limit: int = 64 * MIB) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(limit)).hexdigest()


def snapshot(canary: Canary, *extra_dirs: str) -> dict[str, Any]:
    """Everything an attack could change: every entry's kind, mode, content or link target, the mounts,
    the foreign device's bytes."""
    seen: dict[str, Any] = {}
    for top in (str(canary.root), *extra_dirs):
        for directory, dirs, files in os.walk(top):
            for name in dirs + files:
                path = os.path.join(directory, name)
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    seen[path] = ("link", os.readlink(path))
                elif stat.S_ISREG(st.st_mode):
                    seen[path] = ("file", st.st_mode, digest(path))
                else:
                    seen[path] = ("dir" if stat.S_ISDIR(st.st_mode) else "other", st.st_mode)
    prefix = f"{canary.root}/"
    seen["mounts"] = sorted(
        (e.mount_point, e.source, e.mount_options) for e in read_mountinfo() if e.mount_point.startswith(prefix)
    )
    seen["foreign device"] = digest(canary.foreign_device)
    return seen


def staged_and_published(host: Host, volume: Volume, target: str) -> None:
    """The driver's own volume is still staged and published as it made it."""
    assert host.store.get(volume.id) is not None
    assert host.store.publication(target) is not None
    code, _ = call(host.node.NodeGetVolumeStats, volume.stats_request(target))
    assert code == OK


# --- NodeUnpublishVolume -----------------------------------------------------------------------------


def test_unpublish_touches_only_targets_the_driver_published(host: Host) -> None:
    canary = plant_canaries(host)
    mine = host.volume("mine", mount_cap("ext4"))
    other = host.volume("other", mount_cap("ext4"))
    target = host.target("mine")
    assert call(host.node.NodePublishVolume, mine.publish_request(target)) == (OK, "")
    before = snapshot(canary, other.staging)

    unowned = [path for name, path in canary.paths.items() if name not in ("tmpfs", "foreign-mount")]
    for path in [*unowned, str(canary.root / "nothing-there"), str(canary.root / ("x" * 200))]:
        for volume in (mine, other, Volume("unknown", "", "", mine.cap)):
            assert call(host.node.NodeUnpublishVolume, volume.unpublish_request(path)) == (OK, ""), path
    mounted_but_not_published = [canary.paths["tmpfs"], canary.paths["foreign-mount"], other.staging, mine.staging]
    for path in mounted_but_not_published:
        for volume in (mine, other):
            code, message = call(host.node.NodeUnpublishVolume, volume.unpublish_request(path))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "refusing to unmount it" in message, path
    code, message = call(host.node.NodeUnpublishVolume, other.unpublish_request(target))  # mine's, not other's
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "is where volume mine is published" in message

    assert snapshot(canary, other.staging) == before
    staged_and_published(host, mine, target)
    code, _ = call(host.node.NodeGetVolumeStats, other.stats_request(other.staging))
    assert code == OK

    for _ in range(2):  # its own target: unmounted and removed, then already done
        assert call(host.node.NodeUnpublishVolume, mine.unpublish_request(target)) == (OK, "")
        assert not os.path.lexists(target) and host.store.publication(target) is None
    assert snapshot(canary, other.staging) == before


# --- NodePublishVolume -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mount", "block"])
def test_publish_never_follows_a_link_nor_hides_content_nor_takes_a_relative_path(host: Host, kind: str) -> None:
    canary = plant_canaries(host)
    mine = host.volume("mine", mount_cap("ext4") if kind == "mount" else block_cap())
    other = host.volume("other", mount_cap("ext4"))
    before = snapshot(canary, other.staging)
    refused = {
        canary.paths["file"]: grpc.StatusCode.FAILED_PRECONDITION,
        canary.paths["full-dir"]: grpc.StatusCode.FAILED_PRECONDITION,
        canary.paths["link-to-dir"]: grpc.StatusCode.FAILED_PRECONDITION,
        canary.paths["link-to-file"]: grpc.StatusCode.FAILED_PRECONDITION,
        canary.paths["dangling-link"]: grpc.StatusCode.FAILED_PRECONDITION,
        canary.paths["data-file"]: grpc.StatusCode.FAILED_PRECONDITION,
        canary.paths["tmpfs"]: grpc.StatusCode.ALREADY_EXISTS,
        canary.paths["foreign-mount"]: grpc.StatusCode.ALREADY_EXISTS,
        other.staging: grpc.StatusCode.ALREADY_EXISTS,
        str(canary.root / "no-parent" / "volume"): grpc.StatusCode.FAILED_PRECONDITION,
        "relative/volume": grpc.StatusCode.INVALID_ARGUMENT,
        f"{canary.root}/../canary/file": grpc.StatusCode.INVALID_ARGUMENT,
        f"{canary.root}/nul\0byte": grpc.StatusCode.INVALID_ARGUMENT,
    }
    for path, expected in refused.items():
        code, message = call(host.node.NodePublishVolume, mine.publish_request(path))
        assert code == expected, (path, message)
        assert host.store.publication(path) is None
    assert snapshot(canary, other.staging) == before
    assert not (canary.root / "no-parent").exists()

    # The kind of target the CO may have made already: an empty directory, or for block an empty file.
    empty = canary.paths["empty-dir"] if kind == "mount" else str(canary.root / "empty-file")
    if kind == "block":
        Path(empty).touch()
    wrong = str(canary.root / "empty-file") if kind == "mount" else canary.paths["empty-dir"]
    if kind == "mount":
        Path(wrong).touch()
    code, message = call(host.node.NodePublishVolume, mine.publish_request(wrong))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "is not a" in message
    assert call(host.node.NodePublishVolume, mine.publish_request(empty)) == (OK, "")
    for _ in range(2):
        assert call(host.node.NodeUnpublishVolume, mine.unpublish_request(empty)) == (OK, "")
    assert not os.path.lexists(empty)


# --- access modes across targets ---------------------------------------------------------------------

FP = grpc.StatusCode.FAILED_PRECONDITION
# The CSI spec's AccessMode, for a second publish on the same node while the first is still there:
# (mode, first read-only, second read-only) -> the second publish's answer.
SECOND_PUBLISH = [
    (Mode.SINGLE_NODE_WRITER, False, False, FP),  # "published once as read/write"
    (Mode.SINGLE_NODE_WRITER, False, True, OK),
    (Mode.SINGLE_NODE_WRITER, True, True, OK),
    (Mode.SINGLE_NODE_READER_ONLY, True, True, FP),  # "published once as readonly"
    (Mode.SINGLE_NODE_SINGLE_WRITER, False, False, FP),  # one workload only
    (Mode.SINGLE_NODE_SINGLE_WRITER, False, True, FP),
    (Mode.SINGLE_NODE_SINGLE_WRITER, True, True, FP),
    (Mode.SINGLE_NODE_MULTI_WRITER, False, False, OK),  # "read/write at multiple workloads"
    (Mode.SINGLE_NODE_MULTI_WRITER, False, True, OK),
    (Mode.MULTI_NODE_READER_ONLY, True, True, OK),
    (Mode.MULTI_NODE_SINGLE_WRITER, False, False, FP),  # "only one ... read/write, the rest readonly"
    (Mode.MULTI_NODE_SINGLE_WRITER, False, True, OK),
    (Mode.MULTI_NODE_MULTI_WRITER, False, False, OK),
]


@pytest.mark.parametrize(
    ("mode", "first_ro", "second_ro", "expected"),
    SECOND_PUBLISH,
    ids=[f"{Mode.Mode.Name(m)}-{'ro' if a else 'rw'}-{'ro' if b else 'rw'}" for m, a, b, _ in SECOND_PUBLISH],
)
def test_a_second_publish_on_the_node_follows_the_access_mode(
    host: Host, mode: int, first_ro: bool, second_ro: bool, expected: grpc.StatusCode
) -> None:
    cap = block_cap(mode)  # multi-node modes need a block volume; single-node ones behave the same for mount
    volume = host.volume("vol", cap)
    first, second = host.target("first"), host.target("second")
    for _ in range(2):  # the same publish again is no second publish
        assert call(host.node.NodePublishVolume, volume.publish_request(first, readonly=first_ro)) == (OK, "")
    code, message = call(host.node.NodePublishVolume, volume.publish_request(second, readonly=second_ro))
    assert code == expected, message
    if expected == OK:
        assert call(host.node.NodeUnpublishVolume, volume.unpublish_request(second)) == (OK, "")
    else:
        assert f"already published at {first}" in message and not os.path.lexists(second)
    # At the first target, only the same capability is the same publish.
    code, _ = call(host.node.NodePublishVolume, volume.publish_request(first, readonly=not first_ro))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert call(host.node.NodeUnpublishVolume, volume.unpublish_request(first)) == (OK, "")
    assert call(host.node.NodePublishVolume, volume.publish_request(second, readonly=second_ro)) == (OK, "")
    assert call(host.node.NodeUnpublishVolume, volume.unpublish_request(second)) == (OK, "")


# --- NodeGetVolumeStats ------------------------------------------------------------------------------


def test_stats_check_the_path_before_the_health_of_the_volume(host: Host) -> None:
    canary = plant_canaries(host)
    volume = host.volume("vol", block_cap())
    target = host.target("pod")
    assert call(host.node.NodePublishVolume, volume.publish_request(target)) == (OK, "")
    run("umount", target)
    detach(volume.device)  # the volume is now unhealthy
    for path in [*canary.paths.values(), str(canary.root / "missing")]:
        code, message = call(host.node.NodeGetVolumeStats, volume.stats_request(path))
        assert code == grpc.StatusCode.NOT_FOUND, (path, message)
    for path in (target, volume.staging):  # its own paths: answered, with the condition
        response = host.node.NodeGetVolumeStats(volume.stats_request(path), None)
        assert response.volume_condition.abnormal and "is gone" in response.volume_condition.message


# --- NodeStageVolume ---------------------------------------------------------------------------------


def test_stage_uses_only_an_unused_block_device_and_formats_only_a_blank_one(host: Host) -> None:
    canary = plant_canaries(host)
    before = snapshot(canary)
    fresh = host.loop("fresh.img")
    FP, NF = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND
    attacks = [  # (device_path in publish_context, capability, staging path, expected)
        (str(canary.data_file), mount_cap("ext4"), None, FP),  # a file, not a block device
        (str(canary.data_file), block_cap(), None, FP),
        (canary.foreign_device, mount_cap("ext4"), None, FP),  # data without a signature: never formatted
        (canary.foreign_mounted, mount_cap("ext4"), None, FP),  # mounted elsewhere: in use
        (canary.foreign_mounted, block_cap(), None, FP),
        ("/dev/mbs-no-such-device", block_cap(), None, NF),
        ("/dev/mbs-no-such-device", mount_cap("ext4"), None, NF),
        (canary.paths["link-to-file"], block_cap(), None, FP),
        (fresh, mount_cap("ext4"), canary.paths["tmpfs"], grpc.StatusCode.ALREADY_EXISTS),
        (fresh, mount_cap("ext4"), canary.paths["full-dir"], FP),
        (fresh, mount_cap("ext4"), canary.paths["link-to-dir"], FP),
        (fresh, mount_cap("ext4"), "relative/staging", grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for device, cap, staging, expected in attacks:
        volume = Volume("attack", device, staging or str(host.root / "staging-attack"), cap)
        code, message = call(host.node.NodeStageVolume, volume.stage_request())
        assert code == expected, (device, staging, message)
        assert host.store.get("attack") is None
    assert snapshot(canary) == before
    with open(fresh, "rb") as device:
        assert not device.read(1024**2).strip(b"\0")


# --- volume_mount_group ------------------------------------------------------------------------------


def test_a_publish_whose_group_step_fails_is_undone_and_the_retry_applies_the_group(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mbs_csi.node import service
    from mbs_csi.node.mount_error import MountError

    cap = mount_cap("ext4")
    cap.mount.volume_mount_group = "4321"
    volume = host.volume("vol", cap)
    target = host.target("pod")
    apply_group = service.apply_group

    def fail_once(path: str, gid: int) -> None:
        monkeypatch.setattr(service, "apply_group", apply_group)
        raise MountError(f"cannot give group {gid} access to {path}: injected failure")

    monkeypatch.setattr(service, "apply_group", fail_once)
    code, message = call(host.node.NodePublishVolume, volume.publish_request(target))
    assert code == grpc.StatusCode.INTERNAL and "injected failure" in message
    assert not os.path.lexists(target) and host.store.publication(target) is None  # all undone
    assert call(host.node.NodePublishVolume, volume.publish_request(target)) == (OK, "")
    info = os.stat(target)
    assert info.st_gid == 4321 and info.st_mode & 0o2070 == 0o2070
    assert call(host.node.NodeUnpublishVolume, volume.unpublish_request(target)) == (OK, "")


# --- crash points ------------------------------------------------------------------------------------


class Crash(BaseException):
    """The node plugin killed at this point: no handler runs, what was done stays done."""


def crash_once(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, after: bool) -> None:
    """Make ``owner.name`` crash the plugin once, before it works or after it first worked."""
    real = getattr(owner, name)

    def crashing(*args: Any, **kwargs: Any) -> Any:
        if after:
            real(*args, **kwargs)  # a failure is no crash: it raises as usual, and the next call may crash
        monkeypatch.setattr(owner, name, real)
        raise Crash(name)

    monkeypatch.setattr(owner, name, crashing)


def mounts_at(path: str) -> int:
    return sum(entry.mount_point == path for entry in read_mountinfo())


STAGE_STEPS = [
    ("attach", False),  # the intent is recorded, nothing attached
    ("attach", True),  # attached, the device not recorded yet
    ("format_device", True),  # formatted, not mounted
    ("mount", False),
    ("mount", True),  # mounted, the record not complete
]


def stage_owner(name: str) -> Any:
    from mbs_csi.node import service

    return service.brick if name == "attach" else service


@pytest.mark.parametrize("then", ["retry", "restart"])
@pytest.mark.parametrize(
    ("step", "after"), STAGE_STEPS, ids=[f"{'after' if a else 'before'}-{s}" for s, a in STAGE_STEPS]
)
def test_a_stage_killed_at_any_step_is_finished_by_a_retry_or_undone_at_start(
    host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, step: str, after: bool, then: str
) -> None:
    volume = host.volume("vol", mount_cap("ext4"), stage=False)
    crash_once(monkeypatch, stage_owner(step), step, after)
    with pytest.raises(Crash):
        host.node.NodeStageVolume(volume.stage_request(), None)
    record = host.store.get("vol")
    assert record is not None and record.state == "attaching"  # recorded before anything was attached
    [row] = list_attachments(host.root / "state")
    assert row["state"] == "attaching" and row["problem"] == "a stage that stopped halfway"
    if then == "restart":
        with caplog.at_level(logging.WARNING, logger="mbs_csi.node.service"):
            host.restart()
        assert "at start: volume vol: a stage that stopped halfway was undone" in caplog.text
        assert host.store.get("vol") is None and mounts_at(volume.staging) == 0  # undone
    assert call(host.node.NodeStageVolume, volume.stage_request()) == (OK, "")
    record = host.store.get("vol")
    assert record is not None and record.state == "staged" and record.device_path == volume.device
    assert mounts_at(volume.staging) == 1
    target = host.target("pod")
    assert call(host.node.NodePublishVolume, volume.publish_request(target)) == (OK, "")
    Path(target, "data").write_text("written after the crash")
    [row] = list_attachments(host.root / "state")
    assert row["state"] == "staged" and row["exists"] and row["targets"] == [target]
    assert call(host.node.NodeUnpublishVolume, volume.unpublish_request(target)) == (OK, "")
    unstage = pb.NodeUnstageVolumeRequest(volume_id="vol", staging_target_path=volume.staging)
    assert call(host.node.NodeUnstageVolume, unstage) == (OK, "")
    assert host.store.get("vol") is None and mounts_at(volume.staging) == 0


@pytest.mark.parametrize("then", ["retry", "restart"])
@pytest.mark.parametrize("step", ["mount", "apply_group"])
def test_a_publish_killed_before_or_after_its_mount_is_finished_by_a_retry(
    host: Host, monkeypatch: pytest.MonkeyPatch, step: str, then: str
) -> None:
    from mbs_csi.node import service

    cap = mount_cap("ext4")
    cap.mount.volume_mount_group = "4321"
    volume = host.volume("vol", cap)
    target = host.target("pod")
    crash_once(monkeypatch, service, step, after=step == "mount")
    with pytest.raises(Crash):
        host.node.NodePublishVolume(volume.publish_request(target), None)
    assert host.store.publication(target) is not None  # recorded before mounting
    if then == "restart":
        host.restart()
    assert call(host.node.NodePublishVolume, volume.publish_request(target)) == (OK, "")
    info = os.stat(target)
    assert mounts_at(target) == 1 and info.st_gid == 4321 and info.st_mode & 0o2070 == 0o2070
    assert call(host.node.NodeUnpublishVolume, volume.unpublish_request(target)) == (OK, "")
    assert not os.path.lexists(target) and mounts_at(target) == 0


def test_a_stage_that_failed_or_stopped_halfway_leaves_nothing_to_publish(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the property test: a stage whose protocol has no connector left its intent record (the
    undo's detach failed too), and a publish then bound its staging path, "/", on the target."""
    nothing = Volume("nothing", "/dev/null", "/", block_cap())
    stage = nothing.stage_request()
    stage.publish_context["driver_volume_type"] = "nonsense"
    code, message = call(host.node.NodeStageVolume, stage)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no connector" in message
    assert host.store.get("nothing") is None
    halfway = host.volume("halfway", mount_cap("ext4"), stage=False)
    crash_once(monkeypatch, stage_owner("mount"), "mount", after=True)
    with pytest.raises(Crash):
        host.node.NodeStageVolume(halfway.stage_request(), None)
    for volume in (nothing, halfway):
        target = host.target(volume.id)
        code, message = call(host.node.NodePublishVolume, volume.publish_request(target, readonly=True))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "stage it first" in message
        assert not os.path.lexists(target)


def test_at_start_the_node_names_what_is_no_longer_as_recorded(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    volume = host.volume("vol", mount_cap("ext4"))
    target = host.target("pod")
    assert call(host.node.NodePublishVolume, volume.publish_request(target)) == (OK, "")
    run("umount", target)
    run("umount", volume.staging)  # as after a reboot
    with caplog.at_level(logging.WARNING, logger="mbs_csi.node.service"):
        host.restart()
    assert f"at start: volume vol: {volume.staging} no longer has {volume.device} mounted" in caplog.text
    assert f"at start: volume vol: target {target} is no longer mounted" in caplog.text
    found = last_start(host.root / "state")  # kept for `mbs-csi node attachments`, with this start's time
    assert found is not None and found["fixes"] == [
        f"volume vol: {volume.staging} no longer has {volume.device} mounted",
        f"volume vol: target {target} is no longer mounted",
    ]
    assert f"volume vol: target {target} is no longer mounted" in render([], found, as_json=False)
    stage = volume.stage_request()
    assert call(host.node.NodeStageVolume, stage) == (OK, "")  # kubelet stages and publishes again
    assert call(host.node.NodePublishVolume, volume.publish_request(target)) == (OK, "")
    assert mounts_at(volume.staging) == 1 and mounts_at(target) == 1


def test_at_start_the_node_detaches_the_read_only_views_no_target_uses(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only raw block publish killed between making its view and binding it leaves a view no
    target uses: the next start detaches it, keeps the views that targets use, and says so."""
    from mbs_csi.node import service

    used, left = host.volume("used", block_cap()), host.volume("left", block_cap())
    used_target, left_target = host.target("used"), host.target("left")
    assert call(host.node.NodePublishVolume, used.publish_request(used_target, readonly=True)) == (OK, "")
    [used_view] = readonly_views(used.device)
    crash_once(monkeypatch, service, "mount", after=False)
    with pytest.raises(Crash):
        host.node.NodePublishVolume(left.publish_request(left_target, readonly=True), None)
    [left_view] = readonly_views(left.device)
    host.restart()
    assert readonly_views(used.device) == [used_view] and readonly_views(left.device) == []
    found = last_start(host.root / "state")
    assert found is not None
    assert f"volume left: the read-only view {left_view}, which no target used, was detached" in found["fixes"]
    assert not any(used_view in fix for fix in found["fixes"])
    assert call(host.node.NodePublishVolume, left.publish_request(left_target, readonly=True)) == (OK, "")
    assert [mounted_device(left_target)] == readonly_views(left.device)  # the retry made a new view and bound it
    for volume, target in ((used, used_target), (left, left_target)):
        assert call(host.node.NodeUnpublishVolume, volume.unpublish_request(target)) == (OK, "")
        unstage = pb.NodeUnstageVolumeRequest(volume_id=volume.id, staging_target_path=volume.staging)
        assert call(host.node.NodeUnstageVolume, unstage) == (OK, "")
        assert readonly_views(volume.device) == []


def test_a_target_published_before_targets_were_recorded_is_still_unpublished(host: Host) -> None:
    """An upgrade: the previous version kept no publication records; its bind mounts of a staged volume
    are that volume's to unpublish (and its staging path still is not)."""
    volume = host.volume("vol", mount_cap("ext4"))
    target = host.target("pod")
    assert call(host.node.NodePublishVolume, volume.publish_request(target)) == (OK, "")
    assert host.store.remove_publication(target)  # as the previous version left it
    code, _ = call(host.node.NodeGetVolumeStats, volume.stats_request(target))
    assert code == OK
    code, _ = call(host.node.NodeUnpublishVolume, Volume("other", "", "", volume.cap).unpublish_request(target))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and mounts_at(target) == 1  # not the other volume's
    assert call(host.node.NodeUnpublishVolume, volume.unpublish_request(target)) == (OK, "")
    assert mounts_at(target) == 0 and not os.path.lexists(target)
    code, _ = call(host.node.NodeUnpublishVolume, volume.unpublish_request(volume.staging))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and mounts_at(volume.staging) == 1
