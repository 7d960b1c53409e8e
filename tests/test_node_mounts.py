"""The node's host operations (mbs_csi.node: commands, devices, formatting, resizing, mountinfo,
mount_options, mounting, paths, usage) against real loop devices, real mkfs and real mounts (root only, no
fakes)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mbs_csi.errors import FailedPrecondition
from mbs_csi.node import commands, mount_options, mounting
from mbs_csi.node.devices import block_device_size, probe
from mbs_csi.node.formatting import NotBlankError, format_device
from mbs_csi.node.mount_error import MountError
from mbs_csi.node.mountinfo import (
    MountEntry,
    find_mount,
    is_mounted,
    mounted_device,
    parse_mountinfo_line,
    read_mountinfo,
)
from mbs_csi.node.mounting import mount, unmount
from mbs_csi.node.paths import apply_group, ensure_dir, prepare_target, remove_target
from mbs_csi.node.resizing import resize_filesystem
from mbs_csi.node.usage import filesystem_stats
from testkit.host import CAP_SYS_RESOURCE, has_capability
from testkit.loop import attach, detach, devices_backed_by, reread_capacity, sparse_file

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/loop-control"), reason="needs root and loop devices"
)

GiB = 1024**3
FILESYSTEMS = ["ext4", "xfs", "btrfs"]


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def mounts_under(root: Path) -> list[MountEntry]:
    prefix = str(root) + "/"
    return [e for e in read_mountinfo() if e.mount_point.startswith(prefix)]


def readonly(entry: MountEntry) -> bool:
    """True when this mount (not just its superblock) is read-only."""
    return "ro" in entry.mount_options


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory under /tmp; afterwards nothing under it is mounted and no loop device uses its files."""
    root = Path(tempfile.mkdtemp(prefix="mbs-mounts-", dir="/tmp"))
    yield root
    for entry in reversed(mounts_under(root)):
        subprocess.run(["umount", entry.mount_point], check=False, timeout=60)
    for backing in root.glob("*.img"):
        for device in devices_backed_by(backing):
            detach(device)
    leftovers = [e.mount_point for e in mounts_under(root)]
    loops = [device for backing in root.glob("*.img") for device in devices_backed_by(backing)]
    shutil.rmtree(root, ignore_errors=True)
    assert not leftovers, f"left mounted: {leftovers}"
    assert not loops, f"left attached: {loops}"


@pytest.fixture
def make_loop(workdir: Path) -> Callable[..., tuple[str, Path]]:
    """Make a sparse file of ``size`` bytes and attach it: returns (device, backing file)."""
    count = 0

    def make(size: int = GiB) -> tuple[str, Path]:
        nonlocal count
        count += 1
        backing = sparse_file(workdir / f"disk{count}.img", size)
        return attach(backing), backing

    return make


@pytest.fixture
def loop(make_loop: Callable[..., tuple[str, Path]]) -> str:
    return make_loop()[0]


def new_dir(parent: Path, name: str) -> str:
    path = parent / name
    path.mkdir()
    return str(path)


# --- probing -----------------------------------------------------------------------------------------


def test_blank_device_has_no_filesystem_and_no_signature(loop: str) -> None:
    assert probe(loop) == {}


def test_missing_device_is_an_error_not_blank() -> None:
    with pytest.raises(MountError, match="/dev/mbs-no-such-device"):
        probe("/dev/mbs-no-such-device")
    with pytest.raises(MountError, match="/dev/mbs-no-such-device") as info:
        format_device("/dev/mbs-no-such-device", "ext4")
    assert not isinstance(info.value, NotBlankError)


def test_partition_table_is_a_signature_but_not_a_filesystem(loop: str) -> None:
    mbr = bytearray(512)
    entry = 446  # first partition entry: type 0x83 (Linux), sectors 2048..6143
    mbr[entry + 4] = 0x83
    mbr[entry + 8 : entry + 12] = (2048).to_bytes(4, "little")
    mbr[entry + 12 : entry + 16] = (4096).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    with open(loop, "r+b") as f:
        f.write(mbr)
    assert "TYPE" not in probe(loop)
    with pytest.raises(NotBlankError, match="partition table dos") as info:
        format_device(loop, "ext4")
    assert info.value.filesystem is None
    assert probe(loop).get("PTTYPE") == "dos"  # untouched


def test_swap_signature_is_reported_and_never_formatted(loop: str) -> None:
    run("mkswap", loop)
    assert probe(loop)["TYPE"] == "swap"
    with pytest.raises(NotBlankError, match=r"refusing to format .* swap") as info:
        format_device(loop, "xfs")
    assert info.value.filesystem == "swap"
    assert probe(loop)["TYPE"] == "swap"  # untouched


def test_ambivalent_signatures_are_an_error_and_never_formatted(make_loop: Callable[..., tuple[str, Path]]) -> None:
    ext4_dev, _ = make_loop()
    xfs_dev, _ = make_loop(512 * 1024**2)
    format_device(ext4_dev, "ext4")
    format_device(xfs_dev, "xfs")
    with open(xfs_dev, "rb") as f:
        xfs_superblock = f.read(512)
    with open(ext4_dev, "r+b") as f:  # the ext4 superblock starts at 1024: both are now there
        f.write(xfs_superblock)
    with pytest.raises(MountError, match="several signatures"):
        probe(ext4_dev)
    with pytest.raises(MountError, match="several signatures"):
        format_device(ext4_dev, "btrfs")
    with open(ext4_dev, "rb") as f:  # untouched
        assert f.read(512) == xfs_superblock


def test_block_device_size(make_loop: Callable[..., tuple[str, Path]]) -> None:
    device, backing = make_loop(768 * 1024**2)
    assert block_device_size(device) == 768 * 1024**2 == backing.stat().st_size
    with pytest.raises(MountError, match="blockdev"):
        block_device_size("/dev/mbs-no-such-device")


# --- format ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fs_type", FILESYSTEMS)
def test_format_then_never_reformat(loop: str, workdir: Path, fs_type: str) -> None:
    format_device(loop, fs_type)
    assert probe(loop)["TYPE"] == fs_type

    target = new_dir(workdir, "mnt")
    mount(loop, target, fs_type)
    Path(target, "data").write_text("precious")
    unmount(target)

    for other in FILESYSTEMS:
        with pytest.raises(
            NotBlankError, match=f"refusing to format {loop} as {other}: it already carries {fs_type}"
        ) as info:
            format_device(loop, other)
        assert info.value.filesystem == fs_type
    assert probe(loop)["TYPE"] == fs_type
    mount(loop, target, fs_type)
    assert Path(target, "data").read_text() == "precious"
    unmount(target)


def test_format_rejects_unsupported_filesystem_before_touching_the_device(loop: str) -> None:
    with pytest.raises(ValueError, match="unsupported filesystem 'vfat'"):
        format_device(loop, "vfat")
    assert probe(loop) == {}


# --- mount, unmount, mount table ---------------------------------------------------------------------


def test_mount_unmount_with_awkward_paths(loop: str, workdir: Path) -> None:
    format_device(loop, "ext4")
    for name in ["with space", "tab\there back\\slash"]:
        target = new_dir(workdir, name)
        assert not is_mounted(target)
        assert mounted_device(target) is None
        mount(loop, target, "ext4", options=["noatime"])
        assert is_mounted(target)
        assert is_mounted(target + "/")  # the same mount point, spelled differently
        assert mounted_device(target) == loop
        entry = find_mount(target)
        assert entry is not None
        assert (entry.mount_point, entry.root, entry.fs_type, entry.source) == (target, "/", "ext4", loop)
        assert "noatime" in entry.mount_options and not readonly(entry)
        assert not is_mounted(target + "/lost+found")
        unmount(target)
        assert not is_mounted(target)


def test_unmount_of_what_is_not_mounted_is_a_no_op(workdir: Path) -> None:
    unmount(new_dir(workdir, "empty"))
    unmount(str(workdir / "does-not-exist"))


def test_mount_failure_says_why(loop: str, workdir: Path) -> None:
    target = new_dir(workdir, "mnt")
    with pytest.raises(MountError) as info:
        mount(loop, target, "xfs")  # blank device
    message = str(info.value)
    assert f"mounting {loop} on {target} failed" in message
    assert "wrong filesystem type" in message and "dmesg" in message
    assert info.value.errno == errno.EINVAL
    assert not is_mounted(target)


def test_option_names_split_into_flags_and_filesystem_data() -> None:
    flags, data = mount_options.parse(["noatime,discard", "_netdev", "x-systemd.automount", "defaults", "ro", "rw"])
    assert flags == mount_options.MS_NOATIME  # a later "rw" clears an earlier "ro"
    assert data == "discard"
    assert mount_options.parse(["nosuid", "nodev", "nouuid", "comment=x"]) == (
        mount_options.MS_NOSUID | mount_options.MS_NODEV,
        "nouuid",
    )
    assert mount_options.parse([]) == (0, "")


def test_fstab_only_options_never_reach_the_kernel(loop: str, workdir: Path) -> None:
    format_device(loop, "ext4")
    target = new_dir(workdir, "mnt")
    mount(loop, target, "ext4", options=["defaults", "_netdev", "nofail", "x-mbs.test=1", "noatime", "nodev"])
    entry = find_mount(target)
    assert entry is not None and {"noatime", "nodev"} <= set(entry.mount_options)
    unmount(target)


def test_unknown_filesystem_option_is_refused_and_nothing_is_mounted(loop: str, workdir: Path) -> None:
    format_device(loop, "ext4")
    target = new_dir(workdir, "mnt")
    with pytest.raises(MountError, match="bad option") as info:
        mount(loop, target, "ext4", options=["mbs_no_such_option"])
    assert info.value.errno == errno.EINVAL
    assert not is_mounted(target)


def test_write_protected_device_is_mounted_read_only(make_loop: Callable[..., tuple[str, Path]], workdir: Path) -> None:
    """As mount(8) does: a device attached read-only (a read-only LUN, an RBD snapshot) mounts ro."""
    loop, backing = make_loop()
    format_device(loop, "ext4")
    readonly_loop = attach(backing, read_only=True)
    target = new_dir(workdir, "mnt")
    mount(readonly_loop, target, "ext4")
    entry = find_mount(target)
    assert entry is not None and readonly(entry) and entry.source == readonly_loop
    unmount(target)


def test_unmount_of_a_busy_target_says_so(loop: str, workdir: Path) -> None:
    format_device(loop, "ext4")
    target = new_dir(workdir, "mnt")
    mount(loop, target, "ext4")
    with open(os.path.join(target, "held"), "w"):
        with pytest.raises(MountError, match="target is busy") as info:
            unmount(target)
        assert info.value.errno == errno.EBUSY and is_mounted(target)
    unmount(target)
    assert not is_mounted(target)


def test_a_system_call_stuck_in_the_kernel_answers_after_the_timeout() -> None:
    with pytest.raises(MountError, match=r"sleeping failed: still waiting in the kernel after 0.2 s"):
        mounting._in_thread(lambda: time.sleep(3) or 0, "sleeping", timeout=0.2)


def test_readonly_mount(loop: str, workdir: Path) -> None:
    format_device(loop, "xfs")
    target = new_dir(workdir, "ro")
    mount(loop, target, "xfs", readonly=True)
    entry = find_mount(target)
    assert entry is not None and readonly(entry)
    with pytest.raises(OSError) as info:
        Path(target, "x").write_text("x")
    assert info.value.errno == errno.EROFS
    unmount(target)


def test_bind_mount_of_a_directory(loop: str, workdir: Path) -> None:
    format_device(loop, "ext4")
    staging = new_dir(workdir, "staging")
    mount(loop, staging, "ext4")
    os.mkdir(os.path.join(staging, "sub dir"))
    target = str(workdir / "pod" / "volume")
    ensure_dir(target)

    mount(os.path.join(staging, "sub dir"), target, bind=True)
    entry = find_mount(target)
    assert entry is not None
    assert entry.source == loop  # a bind of a directory shows the filesystem's source
    assert entry.root == "/sub dir"
    assert mounted_device(target) == loop
    Path(target, "written").write_text("through the bind")
    assert Path(staging, "sub dir", "written").read_text() == "through the bind"

    unmount(target)
    assert not is_mounted(target) and is_mounted(staging)
    unmount(staging)


def test_readonly_bind_mount_refuses_writes(loop: str, workdir: Path) -> None:
    format_device(loop, "ext4")
    staging = new_dir(workdir, "staging")
    mount(loop, staging, "ext4")
    target = new_dir(workdir, "target")

    mount(staging, target, bind=True, readonly=True, options=["nosuid", "nodev"])
    entry = find_mount(target)
    assert entry is not None and readonly(entry)
    assert {"nosuid", "nodev"} <= set(entry.mount_options)
    with pytest.raises(OSError) as info:
        Path(target, "x").write_text("x")
    assert info.value.errno == errno.EROFS
    Path(staging, "x").write_text("the staging mount stays writable")
    assert Path(target, "x").read_text() == "the staging mount stays writable"

    unmount(target)
    unmount(staging)


def test_readonly_bind_keeps_the_flags_it_inherited(loop: str, workdir: Path) -> None:
    format_device(loop, "ext4")
    staging = new_dir(workdir, "staging")
    mount(loop, staging, "ext4", options=["nosuid", "noexec", "noatime"])
    target = new_dir(workdir, "target")
    mount(staging, target, bind=True, readonly=True)
    entry = find_mount(target)
    assert entry is not None and readonly(entry)
    assert {"nosuid", "noexec", "noatime"} <= set(entry.mount_options)
    staged = find_mount(staging)
    assert staged is not None and not readonly(staged)
    unmount(target)
    unmount(staging)


def test_bind_mount_of_a_block_device_onto_a_file(loop: str, workdir: Path) -> None:
    (workdir / "pods" / "uid").mkdir(parents=True)
    target = str(workdir / "pods" / "uid" / "block")
    assert prepare_target(target, "block")
    assert not prepare_target(target, "block")  # idempotent: an empty file is used as it is
    mount(loop, target, bind=True)

    st = os.stat(target)
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.stat(loop).st_rdev
    assert is_mounted(target)
    assert mounted_device(target) == loop
    entry = find_mount(target)
    assert entry is not None and entry.root == "/" + os.path.basename(loop)  # the node within /dev's fs
    assert entry.source != loop  # the filesystem holding the node: what mounted_device sees through
    with open(target, "r+b") as f:
        f.write(b"raw block data")
    with open(loop, "rb") as f:
        assert f.read(14) == b"raw block data"

    unmount(target)
    assert not is_mounted(target) and stat.S_ISREG(os.stat(target).st_mode)


def test_readonly_bind_of_a_device_node_does_not_stop_writes(loop: str, workdir: Path) -> None:
    """A fact the node service must know: the kernel checks read-only mounts for files and dirs only."""
    target = str(workdir / "block")
    prepare_target(target, "block")
    mount(loop, target, bind=True, readonly=True)
    entry = find_mount(target)
    assert entry is not None and readonly(entry)
    with open(target, "r+b") as f:
        f.write(b"still writable")
    unmount(target)


# --- resize and statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("fs_type", FILESYSTEMS)
def test_online_resize_after_the_device_grew(
    make_loop: Callable[..., tuple[str, Path]], workdir: Path, fs_type: str
) -> None:
    device, backing = make_loop(GiB)
    format_device(device, fs_type)
    target = new_dir(workdir, "mnt")
    mount(device, target, fs_type)
    before = filesystem_stats(target)
    assert 0.8 * GiB < before["bytes_total"] <= GiB

    with open(backing, "r+b") as f:
        f.truncate(2 * GiB)
    reread_capacity(device)
    assert block_device_size(device) == 2 * GiB
    if fs_type == "ext4" and not has_capability(CAP_SYS_RESOURCE):
        with pytest.raises(FailedPrecondition, match=r"Permission denied .*needs the CAP_SYS_RESOURCE capability"):
            resize_filesystem(device, target, fs_type)
        unmount(target)
        pytest.skip("online ext4 resize needs CAP_SYS_RESOURCE, which this process lacks")
    resize_filesystem(device, target, fs_type)

    after = filesystem_stats(target)
    assert 1.8 * GiB < after["bytes_total"] <= 2 * GiB
    assert after["bytes_available"] > before["bytes_available"] + 0.8 * GiB
    resize_filesystem(device, target, fs_type)  # nothing left to grow: still fine
    unmount(target)


def test_resize_rejects_unsupported_filesystem(loop: str) -> None:
    with pytest.raises(ValueError, match="vfat"):
        resize_filesystem(loop, "/mnt", "vfat")


@pytest.mark.parametrize("fs_type", FILESYSTEMS)
def test_filesystem_stats_agree_with_df(loop: str, workdir: Path, fs_type: str) -> None:
    format_device(loop, fs_type)
    target = new_dir(workdir, "mnt")
    mount(loop, target, fs_type)
    with open(os.path.join(target, "blob"), "wb") as f:
        f.write(os.urandom(8 * 1024**2))
        os.fsync(f.fileno())
    subprocess.run(["sync", "-f", target], check=True, timeout=60)

    stats = filesystem_stats(target)
    fields = run("df", "-B1", "--output=size,used,avail,itotal,iused,iavail", target).splitlines()[1].split()
    size, used, avail, itotal, iused, iavail = (int(x) for x in fields)
    assert (stats["bytes_total"], stats["bytes_used"], stats["bytes_available"]) == (size, used, avail)
    assert (stats["inodes_total"], stats["inodes_used"], stats["inodes_free"]) == (itotal, iused, iavail)
    assert stats["bytes_used"] >= 8 * 1024**2
    if fs_type == "btrfs":
        assert stats["inodes_total"] == 0
    else:
        assert stats["inodes_used"] >= 2 and stats["inodes_free"] > 0
    unmount(target)


def test_filesystem_stats_of_a_missing_path() -> None:
    with pytest.raises(MountError, match="statistics of /nonexistent/mbs"):
        filesystem_stats("/nonexistent/mbs")


# --- paths and ownership -----------------------------------------------------------------------------


def test_ensure_dir_prepare_target_and_remove_target(workdir: Path) -> None:
    directory = str(workdir / "a" / "b")
    ensure_dir(directory)
    ensure_dir(directory)
    assert os.path.isdir(directory)
    file = str(workdir / "a" / "d")
    assert prepare_target(file, "block") and not prepare_target(file, "block")
    assert os.path.isfile(file) and os.path.getsize(file) == 0
    with pytest.raises(MountError, match="non-directory is in the way"):
        ensure_dir(file)
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        prepare_target(directory, "block")
    with pytest.raises(FailedPrecondition, match="not a directory"):
        prepare_target(file, "mount")
    with pytest.raises(FailedPrecondition, match="does not exist: the CO creates it"):
        prepare_target(str(workdir / "missing" / "target"), "mount")
    Path(file).write_text("kept")
    with pytest.raises(FailedPrecondition, match="not empty"):
        prepare_target(file, "block")
    with pytest.raises(FailedPrecondition, match="not empty"):
        remove_target(file)
    link = workdir / "a" / "link"
    link.symlink_to(workdir / "elsewhere")
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        prepare_target(str(link), "mount")
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        remove_target(str(link))
    assert Path(file).read_text() == "kept" and link.is_symlink() and not (workdir / "elsewhere").exists()
    Path(file).unlink()
    remove_target(directory)
    remove_target(directory)  # gone already: fine
    assert not os.path.lexists(directory)


def test_apply_group_on_a_mounted_volume(loop: str, workdir: Path) -> None:
    format_device(loop, "xfs")
    target = new_dir(workdir, "mnt")
    mount(loop, target, "xfs")
    os.chmod(target, 0o700)

    apply_group(target, 4321)
    st = os.stat(target)
    assert st.st_gid == 4321 and st.st_uid == 0
    assert st.st_mode & stat.S_ISGID
    assert stat.S_IMODE(st.st_mode) & 0o070 == 0o070
    apply_group(target, 4321)  # idempotent
    os.mkdir(os.path.join(target, "new"))
    assert os.stat(os.path.join(target, "new")).st_gid == 4321  # inherited through setgid

    with pytest.raises(ValueError):
        apply_group(target, -1)
    unmount(target)
    with pytest.raises(MountError, match="cannot give group 4321"):
        apply_group(str(workdir / "missing"), 4321)


# --- the command runner and the mount table parser ---------------------------------------------------


def test_commands_time_out_with_a_clear_error() -> None:
    with pytest.raises(MountError, match=r"sleeping failed: sleep 30 timed out after 0.2 s"):
        commands.run(["sleep", "30"], "sleeping", timeout=0.2)


def test_missing_command_is_a_mount_error() -> None:
    with pytest.raises(MountError, match="cannot run mbs-no-such-command"):
        commands.run(["mbs-no-such-command"], "running", timeout=5)


def test_parse_mountinfo_line_with_optional_fields_and_escapes() -> None:
    line = r"36 35 98:0 /mnt\040a /mnt/b\011c\134d rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue"
    entry = parse_mountinfo_line(line)
    assert entry.root == "/mnt a"
    assert entry.mount_point == "/mnt/b\tc\\d"
    assert entry.mount_options == ("rw", "noatime") and not readonly(entry)
    assert (entry.fs_type, entry.source) == ("ext3", "/dev/root")


HOST_MODULES = (
    "mbs_csi.filesystems",
    "mbs_csi.node.commands",
    "mbs_csi.node.devices",
    "mbs_csi.node.formatting",
    "mbs_csi.node.mount_error",
    "mbs_csi.node.mount_options",
    "mbs_csi.node.mountinfo",
    "mbs_csi.node.mounting",
    "mbs_csi.node.paths",
    "mbs_csi.node.readonly_block",
    "mbs_csi.node.resizing",
    "mbs_csi.node.usage",
)


def test_imports_only_the_standard_library() -> None:
    code = (
        f"import sys; before = set(sys.modules); import {', '.join(HOST_MODULES)}; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names) - {'mbs_csi'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"
