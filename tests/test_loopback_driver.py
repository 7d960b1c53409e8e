"""The loopback backend (mbs_csi.drivers.loopback) through real cinderlib, real files and real loop devices.

cinderlib runs in child processes (tests/loopback_child.py): its setup is once per process and patches
process-global state. This process checks the results itself: files, allocated blocks, losetup, blockdev.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.host import REPO, short_tmpdir
from testkit.loop import detach
from testkit.loop import devices_backed_by as bound_to
from testkit.loop import devices_under as loop_devices_under
from testkit.processes import ProcessTree
from testkit.wait import wait_until

GiB = 1024**3
PATTERN = b"mbs-csi loopback " * 241  # 4097 bytes: not block aligned


class ChildError(Exception):
    pass


class Child:
    """A cinderlib process with the loopback backend, answering one JSON request per line."""

    def __init__(self, workdir: Path, loopback_dir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"child-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.tree = ProcessTree(
            [sys.executable, "-m", "tests.loopback_child", str(workdir), str(loopback_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
        )
        self.proc = self.tree.proc

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def send(self, op: str, **args: Any) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdout
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"child gave no answer; its log ends with:\n{self.log_tail()}")
        return json.loads(line)

    def call(self, op: str, **args: Any) -> Any:
        self.send(op, **args)
        reply = self.receive()
        if not reply["ok"]:
            raise ChildError(reply["error"])
        return reply["result"]

    def close(self) -> None:
        """Let the child exit on the end of its input (SIGKILL after a while); stop whatever it left."""
        if self.proc.stdin:
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self.tree.kill()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


def lock_file(workdir: Path, volume_name: str) -> Path:
    """The volume's lock file: cinder.coordination's file lock, in the children's ``file_locks_path``."""
    return workdir / f"cinder-loopback-{volume_name}"


def backing_file(device: str) -> str:
    return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()


def device_size(device: str) -> int:
    return int(subprocess.run(["blockdev", "--getsize64", device], capture_output=True, text=True, check=True).stdout)


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = short_tmpdir("mbs-loopback-")
    yield path
    leftover = loop_devices_under(path)
    for device in leftover:
        detach(device)
    shutil.rmtree(path, ignore_errors=True)
    assert not leftover, f"loop devices left bound to test files: {leftover}"


@pytest.fixture(scope="module")
def loopback_dir(workdir: Path) -> Path:
    return workdir / "volumes"  # created by the driver's do_setup


@pytest.fixture(scope="module")
def child(workdir: Path, loopback_dir: Path) -> Iterator[Child]:
    proc = Child(workdir, loopback_dir)
    yield proc
    proc.close()


@pytest.fixture
def vol(child: Child, loopback_dir: Path) -> Iterator[dict[str, Any]]:
    """A fresh 1 GiB volume, deleted afterwards (disconnected first if a test left it connected)."""
    info = child.call("create", size=1)
    info["path"] = loopback_dir / info["name"]
    yield info
    child.call("disconnect", id=info["id"])
    child.call("delete", id=info["id"])


def test_setup_creates_loopback_dir(child: Child, loopback_dir: Path) -> None:
    child.call("stats")  # the backend is up
    assert loopback_dir.is_dir()


def test_create_makes_sparse_file_of_requested_size(child: Child, loopback_dir: Path) -> None:
    info = child.call("create", size=2)
    path = loopback_dir / info["name"]
    assert info["name"] == f"volume-{info['id']}"
    assert info["status"] == "available"
    st = path.stat()
    assert st.st_size == 2 * GiB
    assert st.st_blocks * 512 <= 1024 * 1024, "a new volume must be sparse"
    child.call("delete", id=info["id"])
    assert not path.exists()


def test_clone_copies_content(child: Child, vol: dict[str, Any], loopback_dir: Path) -> None:
    write_at(vol["path"], 0, PATTERN)
    write_at(vol["path"], GiB - len(PATTERN), PATTERN)
    clone = child.call("clone", id=vol["id"])
    path = loopback_dir / clone["name"]
    try:
        assert clone["size"] == 1
        assert path.stat().st_size == GiB
        assert read_at(path, 0, len(PATTERN)) == PATTERN
        assert read_at(path, GiB - len(PATTERN), len(PATTERN)) == PATTERN
        assert read_at(path, GiB // 2, 4096) == bytes(4096)
        assert path.stat().st_blocks * 512 < 64 * 1024 * 1024, "a clone must stay sparse"
        assert not [p for p in loopback_dir.iterdir() if p.name.startswith(".tmp-")]
    finally:
        child.call("delete", id=clone["id"])


def test_volume_from_snapshot_has_snapshot_content(child: Child, vol: dict[str, Any], loopback_dir: Path) -> None:
    write_at(vol["path"], 0, PATTERN)
    snap = child.call("snapshot", id=vol["id"])
    snap_path = loopback_dir / snap["name"]
    assert snap["name"] == f"snapshot-{snap['id']}"
    assert snap_path.stat().st_size == GiB
    write_at(vol["path"], 0, b"X" * len(PATTERN))  # a later write to the source
    new = child.call("from_snapshot", id=snap["id"])
    path = loopback_dir / new["name"]
    try:
        assert path.stat().st_size == GiB
        assert read_at(path, 0, len(PATTERN)) == PATTERN
        assert read_at(snap_path, 0, len(PATTERN)) == PATTERN
    finally:
        child.call("delete", id=new["id"])
        child.call("delete_snapshot", id=snap["id"])
    assert not snap_path.exists()


def test_clone_and_volume_from_snapshot_bigger_than_source_are_grown(
    child: Child, vol: dict[str, Any], loopback_dir: Path
) -> None:
    write_at(vol["path"], GiB - len(PATTERN), PATTERN)
    clone = child.call("clone", id=vol["id"], size=3)
    snap = child.call("snapshot", id=vol["id"])
    new = child.call("from_snapshot", id=snap["id"], size=2)
    try:
        for info, size in ((clone, 3), (new, 2)):
            path = loopback_dir / info["name"]
            assert info["size"] == size
            assert path.stat().st_size == size * GiB
            assert read_at(path, GiB - len(PATTERN), len(PATTERN)) == PATTERN
            assert read_at(path, GiB, 4096) == bytes(4096)
    finally:
        child.call("delete", id=clone["id"])
        child.call("delete", id=new["id"])
        child.call("delete_snapshot", id=snap["id"])


def test_extend_grows_file(child: Child, vol: dict[str, Any]) -> None:
    assert child.call("extend", id=vol["id"], size=3) == 3 * GiB
    assert vol["path"].stat().st_size == 3 * GiB
    assert child.call("stored", id=vol["id"])["size"] == 3


def test_extend_grows_attached_loop_device(child: Child, vol: dict[str, Any]) -> None:
    device = child.call("connect", id=vol["id"])["data"]["device_path"]
    assert device_size(device) == GiB
    child.call("extend", id=vol["id"], size=2)
    assert vol["path"].stat().st_size == 2 * GiB
    assert device_size(device) == 2 * GiB


def test_connect_exposes_file_on_loop_device_and_disconnect_releases_it(child: Child, vol: dict[str, Any]) -> None:
    conn = child.call("connect", id=vol["id"])
    assert conn["driver_volume_type"] == "local"
    device = conn["data"]["device_path"]
    assert device.startswith("/dev/loop")
    assert Path(device).exists()
    assert backing_file(device) == str(vol["path"])
    assert bound_to(vol["path"]) == [device]

    write_at(vol["path"], 0, PATTERN)  # the device shows the file's content
    assert read_at(Path(device), 0, len(PATTERN)) == PATTERN

    again = child.call("connect", id=vol["id"])
    assert again["data"]["device_path"] == device
    assert bound_to(vol["path"]) == [device]

    assert child.call("disconnect", id=vol["id"]) == 2
    # Detached; a device another process (udev probing it after our read) still has open is freed by the
    # kernel when that process closes it.
    wait_until(lambda: bound_to(vol["path"]) == [], 60, "the loop device to be released")


def test_disconnect_without_device_is_fine(child: Child, vol: dict[str, Any]) -> None:
    child.call("connect", id=vol["id"])
    subprocess.run(["losetup", "--detach", *bound_to(vol["path"])], check=True)  # released behind its back
    assert child.call("disconnect", id=vol["id"]) == 1
    wait_until(lambda: bound_to(vol["path"]) == [], 60, "the loop device to be released")


def test_device_still_open_at_disconnect_is_not_reused(child: Child, vol: dict[str, Any]) -> None:
    """losetup -d on an open device only marks it autoclear: it goes away when closed, so never reuse it."""
    first = child.call("connect", id=vol["id"])["data"]["device_path"]
    fd = os.open(first, os.O_RDONLY)
    try:
        child.call("disconnect", id=vol["id"])
        assert bound_to(vol["path"]) == [first]  # still open here
        second = child.call("connect", id=vol["id"])["data"]["device_path"]
        assert second != first
    finally:
        os.close(fd)
    wait_until(lambda: first not in bound_to(vol["path"]), 60, f"{first} to go away once closed")
    assert bound_to(vol["path"]) == [second]


def test_delete_detaches_and_removes_file(child: Child, workdir: Path, loopback_dir: Path) -> None:
    info = child.call("create", size=1)
    path = loopback_dir / info["name"]
    child.call("connect", id=info["id"])
    assert bound_to(path)
    assert lock_file(workdir, info["name"]).exists()
    child.call("delete", id=info["id"])
    assert not path.exists()
    assert not loop_devices_under(loopback_dir)
    assert not lock_file(workdir, info["name"]).exists()


def test_delete_when_file_is_already_gone(child: Child, loopback_dir: Path) -> None:
    info = child.call("create", size=1)
    (loopback_dir / info["name"]).unlink()
    child.call("delete", id=info["id"])
    with pytest.raises(ChildError, match="VolumeNotFound"):
        child.call("stored", id=info["id"])


def test_delete_snapshot_when_file_is_already_gone(child: Child, vol: dict[str, Any], loopback_dir: Path) -> None:
    snap = child.call("snapshot", id=vol["id"])
    (loopback_dir / snap["name"]).unlink()
    child.call("delete_snapshot", id=snap["id"])


def test_operations_on_missing_source_fail_clearly(child: Child, vol: dict[str, Any], workdir: Path) -> None:
    vol["path"].unlink()
    with pytest.raises(ChildError, match=r"VolumeBackendAPIException: .*volume file .* does not exist"):
        child.call("clone", id=vol["id"])
    with pytest.raises(ChildError, match="does not exist"):
        child.call("connect", id=vol["id"])
    with pytest.raises(ChildError, match="does not exist"):
        child.call("extend", id=vol["id"], size=2)
    assert not lock_file(workdir, vol["name"]).exists()


def test_stats_report_the_real_filesystem(child: Child, vol: dict[str, Any], loopback_dir: Path) -> None:
    stats = child.call("stats", refresh=True)
    fs = os.statvfs(loopback_dir)
    total, free = fs.f_blocks * fs.f_frsize / GiB, fs.f_bavail * fs.f_frsize / GiB
    assert stats["total_capacity_gb"] == pytest.approx(total, abs=0.01)
    assert stats["free_capacity_gb"] == pytest.approx(free, abs=0.1)  # other writers on the host
    volumes = [p for p in loopback_dir.iterdir() if p.name.startswith("volume-")]
    assert stats["provisioned_capacity_gb"] == pytest.approx(sum(p.stat().st_size for p in volumes) / GiB)
    assert stats["provisioned_capacity_gb"] >= 1
    assert stats["reserved_percentage"] == 0
    assert stats["thin_provisioning_support"] is True
    assert stats["thick_provisioning_support"] is False
    assert stats["multiattach"] is False
    assert stats["storage_protocol"] == "local"
    assert stats["vendor_name"] == "mbs-csi"
    assert stats["driver_version"]
    assert stats["volume_backend_name"] == "loopback-test"
    [pool] = stats["pools"]
    assert pool["pool_name"] == "loopback-test"
    assert pool["total_capacity_gb"] == stats["total_capacity_gb"]


def test_loopback_dir_is_required(child: Child) -> None:
    with pytest.raises(ChildError, match="loopback_dir is required"):
        child.call("new_backend", cfg={"name": "no-dir"})


def test_second_backend_in_same_process_uses_its_own_dir(child: Child, workdir: Path) -> None:
    other = workdir / "other"
    stats = child.call("new_backend", cfg={"name": "other", "loopback_dir": str(other)})
    assert other.is_dir()
    assert stats["volume_backend_name"] == "other"
    assert stats["provisioned_capacity_gb"] == 0


def test_concurrent_connects_from_several_processes_share_one_device(
    child: Child, vol: dict[str, Any], workdir: Path, loopback_dir: Path
) -> None:
    others = [Child(workdir, loopback_dir) for _ in range(3)]
    try:
        for other in others:  # start up (set-up is not what races here)
            other.call("stats", refresh=False)
        for other in others:
            other.send("connect", id=vol["id"])
        devices = set()
        for other in others:
            reply = other.receive()
            assert reply["ok"], reply
            devices.add(reply["result"]["data"]["device_path"])
        assert len(devices) == 1
        assert bound_to(vol["path"]) == list(devices)
    finally:
        for other in others:
            other.close()


# --- crashes ------------------------------------------------------------------------------------------


def tmp_files(loopback_dir: Path) -> list[Path]:
    return sorted(loopback_dir.glob(".tmp-*"))


def made_name(tmp: Path) -> str:
    """The volume or snapshot whose making left the temp file ``tmp``."""
    return tmp.name.removeprefix(".tmp-")


@contextlib.contextmanager
def hung_mid_copy(workdir: Path, loopback_dir: Path, op: str, **args: Any) -> Iterator[Path]:
    """A child of its own running ``op`` (a copy), stopped once ``cp`` is done and before the copy got
    its name: yield the temp file it wrote; the child is killed (-9) at the end."""
    before = set(tmp_files(loopback_dir))
    marker = workdir / f"copied-{time.monotonic_ns()}"
    copying = Child(workdir, loopback_dir)
    try:
        copying.call("hang_after_copies", marker=str(marker))
        copying.send(op, **args)
        wait_until(marker.exists, 120, lambda: f"the copy; the child's log ends with:\n{copying.log_tail()}")
        [tmp] = set(tmp_files(loopback_dir)) - before
        yield tmp
    finally:
        copying.tree.kill()
        copying.close()


def test_a_crash_mid_copy_leaves_a_temp_file_that_the_retry_removes(
    child: Child, vol: dict[str, Any], workdir: Path, loopback_dir: Path
) -> None:
    """A clone killed mid-copy leaves its temp file, holding the data copied so far; deleting the clone,
    as the controller does before it tries a failed create again, removes it."""
    write_at(vol["path"], 0, PATTERN)
    with hung_mid_copy(workdir, loopback_dir, "clone", id=vol["id"]) as left:
        pass
    assert read_at(left, 0, len(PATTERN)) == PATTERN
    child.call("driver_delete", kind="volume", name=made_name(left))
    assert tmp_files(loopback_dir) == []
    assert not lock_file(workdir, made_name(left)).exists()


def test_start_up_removes_what_a_crash_left_and_spares_a_copy_in_progress(
    child: Child, vol: dict[str, Any], workdir: Path, loopback_dir: Path
) -> None:
    """Processes sharing one loopback dir: one that starts removes the temp files of copies whose process
    died, never that of a copy another process is making right now."""
    with hung_mid_copy(workdir, loopback_dir, "snapshot", id=vol["id"]) as crashed:
        pass
    with hung_mid_copy(workdir, loopback_dir, "clone", id=vol["id"]) as in_progress:
        starting = Child(workdir, loopback_dir)
        try:
            starting.call("stats", refresh=False)  # it answers: its driver has set itself up
        finally:
            starting.close()
        assert tmp_files(loopback_dir) == [in_progress]
    assert not lock_file(workdir, made_name(crashed)).exists()
    child.call("driver_delete", kind="volume", name=made_name(in_progress))  # as the controller's retry
    assert tmp_files(loopback_dir) == []
