"""Filesystem and mount helpers for the node plugin: probe, format, mount, bind, resize, stats.

Mounting and unmounting are system calls (mount(2), umount2(2)); probing, formatting and resizing run
util-linux and the filesystems' tools. Every external command runs with a list argv (never a shell),
``LC_ALL=C``, stdin from /dev/null and a timeout; a failure raises :class:`MountError` naming what
failed, the command and its (trimmed) stderr, or for a system call the reason and the errno. This module
imports only the standard library: the node role must start fast and stay small.

Formatting is guarded: :func:`format_device` refuses a device that carries *any* signature blkid knows
(filesystem, partition table, swap, LUKS, LVM, RAID member...), because ``mkfs.ext4`` itself overwrites an
existing filesystem without asking when stdin is not a terminal. Data is never reformatted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import stat
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict

# Seconds. Probing and (un)mounting are quick unless the storage is in trouble; mkfs and online resize
# of a large volume on remote storage can take minutes.
QUICK_TIMEOUT = 60.0
MOUNT_TIMEOUT = 300.0
MKFS_TIMEOUT = 1800.0
RESIZE_TIMEOUT = 1800.0

# After killing a timed-out command, how long to wait for it to exit. A process stuck in the kernel on
# dead storage (D state) does not die: it is left behind rather than blocking the caller forever.
_KILL_WAIT = 5.0
_STDERR_LIMIT = 1000

# Options chosen for fresh volumes that may be large and thinly provisioned (as ceph-csi does):
# no discard pass over the whole device, lazy inode-table and journal initialisation, and for ext4 no
# blocks reserved for root (kubelet's mount-utils uses -m0 too). mkfs.xfs and mkfs.btrfs refuse an
# existing filesystem on their own (no -f is passed); mkfs.ext4 does not, hence the signature check.
MKFS_COMMANDS: dict[str, tuple[str, ...]] = {
    "ext4": ("mkfs.ext4", "-F", "-q", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"),
    "xfs": ("mkfs.xfs", "-q", "-K"),
    "btrfs": ("mkfs.btrfs", "-q", "-K"),
}
SUPPORTED_FILESYSTEMS = frozenset(MKFS_COMMANDS)

_LOG = logging.getLogger(__name__)

# blkid exit codes (blkid(8)).
_BLKID_NOTHING_FOUND = 2
_BLKID_AMBIVALENT = 8


class MountError(Exception):
    """A filesystem or mount operation failed; the message says what and includes the command's stderr."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
        errno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.command = tuple(command)
        self.returncode = returncode
        self.stderr = stderr
        self.errno = errno  # set when a system call failed (mount, umount)


class NotBlankError(MountError):
    """:func:`format_device` refused a device that is not blank; ``filesystem`` is what blkid found on it."""

    def __init__(self, device: str, fs_type: str, filesystem: str | None, partition_table: str | None) -> None:
        found = filesystem or (f"partition table {partition_table}" if partition_table else "data")
        super().__init__(f"refusing to format {device} as {fs_type}: it already carries {found}")
        self.filesystem = filesystem


class FilesystemStats(TypedDict):
    """What :func:`filesystem_stats` returns: the numbers ``df`` shows (bytes and inodes)."""

    bytes_total: int
    bytes_used: int
    bytes_available: int
    inodes_total: int
    inodes_used: int
    inodes_free: int


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``, with octal escapes (``\\040`` ...) decoded.

    ``source`` is the mount source (``/dev/loop3`` for a block filesystem, ``devtmpfs`` for a device node
    bind-mounted from /dev); ``root`` is the path within that filesystem that is mounted: ``/`` for a
    whole filesystem, ``/some/dir`` for a bind mount of a directory, ``/loop3`` for a bind mount of the
    device node /dev/loop3.
    """

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        """True when this mount (not just its superblock) is read-only."""
        return "ro" in self.mount_options


def _trim(text: str) -> str:
    text = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= _STDERR_LIMIT else "..." + text[-_STDERR_LIMIT:]


def run(
    argv: Sequence[str], what: str, timeout: float, ok_codes: Sequence[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; return the result when its exit code is in ``ok_codes``, else raise MountError."""
    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",
            env=env,
        )
    except OSError as exc:
        raise MountError(f"{what} failed: cannot run {argv[0]}: {exc.strerror}", command=argv) from exc
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        # A command stuck in the kernel does not die: leave it (Popen reaps it later if it ever exits).
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=_KILL_WAIT)
        raise MountError(f"{what} failed: {' '.join(argv)} timed out after {timeout:g} s", command=argv) from exc
    if proc.returncode not in ok_codes:
        err = _trim(stderr) or _trim(stdout)
        raise MountError(
            f"{what} failed: {' '.join(argv)} exited with code {proc.returncode}: {err or '(no output)'}",
            command=argv,
            returncode=proc.returncode,
            stderr=err,
        )
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


# --- probing -----------------------------------------------------------------------------------------


def _check_readable(device: str) -> None:
    """Raise MountError unless ``device`` exists and its first block can be read.

    blkid answers "nothing found" (exit 2) also for a device it cannot open or read: this tells a blank
    device from a missing or broken one.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"cannot open device {device}: {exc.strerror}") from exc
    try:
        os.pread(fd, 4096, 0)
    except OSError as exc:
        raise MountError(f"cannot read device {device}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def probe(device: str, *, timeout: float = QUICK_TIMEOUT) -> dict[str, str]:
    """Low-level probe of ``device`` (``blkid -p -o export``): ``{}`` when blkid finds nothing.

    Keys are blkid's (``TYPE``, ``USAGE``, ``PTTYPE``, ``UUID``...). Raises MountError when the device
    is missing or unreadable, when blkid fails, and when the result is ambivalent (several signatures,
    e.g. leftovers of an earlier filesystem): such a device is neither blank nor safely mountable.
    """
    argv = ["blkid", "-p", "-o", "export", device]
    result = run(argv, f"probing {device}", timeout, ok_codes=(0, _BLKID_NOTHING_FOUND, _BLKID_AMBIVALENT))
    if result.returncode == _BLKID_AMBIVALENT:
        raise MountError(
            f"{device} carries several signatures (ambivalent probe result); inspect it with 'wipefs {device}': "
            f"{_trim(result.stderr)}",
            command=argv,
            returncode=result.returncode,
            stderr=_trim(result.stderr),
        )
    if result.returncode == _BLKID_NOTHING_FOUND:
        _check_readable(device)
        return {}
    values: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def filesystem_of(device: str, *, timeout: float = QUICK_TIMEOUT) -> str | None:
    """The type blkid reports for the content of ``device`` (``ext4``, ``xfs``, ``swap``, ``crypto_LUKS``...).

    None when there is no filesystem-like signature. None does **not** mean blank: a device with only a
    partition table gives None; use :func:`has_signature` before formatting. Raises MountError on an
    ambivalent probe (several filesystem signatures) or an unreadable device.
    """
    return probe(device, timeout=timeout).get("TYPE") or None


def has_signature(device: str, *, timeout: float = QUICK_TIMEOUT) -> bool:
    """True when ``device`` carries any signature blkid knows: filesystem, partition table, swap, LUKS..."""
    try:
        values = probe(device, timeout=timeout)
    except MountError as exc:
        if exc.returncode == _BLKID_AMBIVALENT:
            return True
        raise
    return any(values.get(key) for key in ("TYPE", "PTTYPE", "USAGE"))


def block_device_size(device: str, *, timeout: float = QUICK_TIMEOUT) -> int:
    """Size of the block device in bytes (``blockdev --getsize64``)."""
    result = run(["blockdev", "--getsize64", device], f"reading the size of {device}", timeout)
    try:
        return int(result.stdout.strip())
    except ValueError as exc:
        raise MountError(f"reading the size of {device} failed: unexpected output {result.stdout.strip()!r}") from exc


# --- formatting and resizing -------------------------------------------------------------------------


def format_device(device: str, fs_type: str, *, timeout: float = MKFS_TIMEOUT) -> None:
    """Make a ``fs_type`` filesystem on ``device``, which must be blank.

    Raises ValueError for a filesystem other than ext4, xfs or btrfs, :class:`NotBlankError` when the
    device carries any signature (nothing is written then), and MountError when probing or mkfs fails.
    """
    if fs_type not in MKFS_COMMANDS:
        raise ValueError(f"unsupported filesystem {fs_type!r}: use one of {', '.join(sorted(MKFS_COMMANDS))}")
    values = probe(device)  # raises on an ambivalent result: several signatures
    if any(values.get(key) for key in ("TYPE", "PTTYPE", "USAGE")):
        raise NotBlankError(device, fs_type, values.get("TYPE") or None, values.get("PTTYPE") or None)
    run([*MKFS_COMMANDS[fs_type], device], f"formatting {device} as {fs_type}", timeout)


def resize_filesystem(device: str, mount_point: str, fs_type: str, *, timeout: float = RESIZE_TIMEOUT) -> None:
    """Grow the filesystem mounted at ``mount_point`` (from ``device``) to fill the device, online.

    The device must already show its new size (os-brick's extend, ``losetup -c``...).
    """
    if fs_type in ("ext4", "ext3", "ext2"):
        argv = ["resize2fs", device]
    elif fs_type == "xfs":
        argv = ["xfs_growfs", "-d", mount_point]
    elif fs_type == "btrfs":
        argv = ["btrfs", "filesystem", "resize", "max", mount_point]
    else:
        raise ValueError(f"unsupported filesystem {fs_type!r} for resize: use ext4, xfs or btrfs")
    try:
        run(argv, f"resizing the {fs_type} filesystem on {device} at {mount_point}", timeout)
    except MountError as exc:
        if argv[0] == "resize2fs" and "Permission denied" in exc.stderr:
            # The kernel refuses EXT4_IOC_RESIZE_FS with EPERM without CAP_SYS_RESOURCE.
            raise MountError(
                f"{exc} (online ext4 resize needs the CAP_SYS_RESOURCE capability)",
                command=exc.command,
                returncode=exc.returncode,
                stderr=exc.stderr,
            ) from exc
        raise


# --- mount table -------------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    r"""Decode the octal escapes the kernel uses in mountinfo (``\040`` space, ``\011`` tab, ``\134`` ...)."""
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        chunk = raw[i + 1 : i + 4]
        if raw[i] == 0x5C and len(chunk) == 3 and all(0x30 <= c <= 0x37 for c in chunk):
            out.append(int(chunk, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def parse_mountinfo_line(line: str) -> MountEntry:
    """Parse one line of ``/proc/<pid>/mountinfo`` (proc(5))."""
    fields = line.split()
    sep = fields.index("-", 6)
    major, _, minor = fields[2].partition(":")
    return MountEntry(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        major=int(major),
        minor=int(minor),
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        mount_options=tuple(fields[5].split(",")),
        fs_type=_unescape(fields[sep + 1]),
        source=_unescape(fields[sep + 2]),
        super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
    )


def read_mountinfo() -> list[MountEntry]:
    """This process's mount table, in kernel order (a later entry on the same point is mounted on top)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [parse_mountinfo_line(line) for line in f if line.strip()]


def find_mount(target: str) -> MountEntry | None:
    """The topmost mount at ``target`` (symlinks and ``..`` resolved), or None when nothing is mounted there."""
    path = os.path.realpath(target)
    found = None
    for entry in read_mountinfo():
        if entry.mount_point == path:
            found = entry
    return found


def is_mounted(target: str) -> bool:
    """True when something is mounted at ``target`` itself (not merely somewhere above it)."""
    return find_mount(target) is not None


def mount_source(target: str) -> str | None:
    """The mount source of the topmost mount at ``target`` as mountinfo shows it, or None when not mounted.

    For a filesystem mounted from a device, and for a bind mount of a directory inside it, that is the
    device (``/dev/loop3``): a bind mount shows the source *filesystem*, and the directory it came from
    is :attr:`MountEntry.root` (``find_mount(target).root``, ``/`` for a whole filesystem). For a device
    node bind-mounted onto a file (raw block publish) it is the filesystem holding the node
    (``devtmpfs``), with root ``/loop3``: use :func:`mounted_device` to get ``/dev/loop3``.
    """
    entry = find_mount(target)
    return entry.source if entry is not None else None


def _device_path(rdev: int) -> str | None:
    sys_dir = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    try:
        with open(os.path.join(sys_dir, "uevent"), encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == "DEVNAME":
                    return "/dev/" + value
    except OSError:
        pass
    name = os.path.basename(os.path.realpath(sys_dir))
    return f"/dev/{name}" if name and name != f"{os.major(rdev)}:{os.minor(rdev)}" else None


def mounted_device(target: str) -> str | None:
    """The block device behind the mount at ``target``, or None when nothing is mounted or no device backs it.

    For a device node bind-mounted onto a file, the device of that node (``/dev/loop3``); for a filesystem
    or a bind mount of a directory within it, the mount source when it is a ``/dev/`` path.
    """
    entry = find_mount(target)
    if entry is None:
        return None
    try:
        st = os.stat(target)
    except OSError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        return _device_path(st.st_rdev)
    return entry.source if entry.source.startswith("/dev/") else None


# --- mount and unmount -------------------------------------------------------------------------------
#
# Mounts and unmounts are mount(2) and umount2(2) calls, not mount(8) and umount(8) processes: a node
# stages and publishes on every pod start, and a fork and exec of util-linux costs more than the whole
# kernel call. The filesystems are ext4, xfs and btrfs only, which need no mount helper. mount(8)'s
# option handling is kept: the per-mount flags by name, fstab-only options dropped, everything else
# passed to the filesystem, and a write-protected device mounted read-only with a warning.

# Kernel mount flags (<linux/mount.h>).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_SILENT = 32768
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# Option name -> (flag, True to set it / False to clear it), the names mount(8) knows.
_FLAG_OPTIONS: dict[str, tuple[int, bool]] = {
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True),
    "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "mand": (MS_MANDLOCK, True),
    "nomand": (MS_MANDLOCK, False),
    "noatime": (MS_NOATIME, True),
    "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True),
    "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True),
    "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True),
    "nostrictatime": (MS_STRICTATIME, False),
    "lazytime": (MS_LAZYTIME, True),
    "nolazytime": (MS_LAZYTIME, False),
    "nosymfollow": (MS_NOSYMFOLLOW, True),
    "symfollow": (MS_NOSYMFOLLOW, False),
    "silent": (MS_SILENT, True),
    "loud": (MS_SILENT, False),
}
# Options that mean something to mount(8) and fstab only: the kernel must never see them.
_USERSPACE_OPTIONS = frozenset(
    {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail", "_netdev"}
)
_USERSPACE_PREFIXES = ("x-", "X-", "comment=", "helper=", "uhelper=")

# The per-mount flags statvfs(3) reports, as mount flags: what a bind remount must keep.
_STATVFS_FLAGS = (
    (os.ST_RDONLY, MS_RDONLY),
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_SYNCHRONOUS, MS_SYNCHRONOUS),
    (os.ST_MANDLOCK, MS_MANDLOCK),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)

# What an errno from mount(2) or umount2(2) means here, in words a person can act on.
_MOUNT_REASONS = {
    errno.EINVAL: "wrong filesystem type, bad option or bad superblock (the kernel log, dmesg, says which)",
    errno.ENODEV: "the kernel does not know this filesystem type",
    errno.ENOTBLK: "the source is not a block device",
    errno.ENXIO: "the device does not exist",
    errno.ENOENT: "the source or the mount point does not exist",
    errno.EBUSY: "the device is already mounted or busy",
    errno.EPERM: "not allowed: mounting needs CAP_SYS_ADMIN",
}
_UNMOUNT_REASONS = {
    errno.EBUSY: "target is busy (a process still has files open there)",
    errno.EINVAL: "nothing is mounted there",
    errno.EPERM: "not allowed: unmounting needs CAP_SYS_ADMIN",
}


def mount_options(options: Sequence[str]) -> tuple[int, str]:
    """Split mount(8)-style option names into (mount flags, filesystem data), as mount(8) does.

    Flag names (``ro``, ``nosuid``, ``noatime``...) become bits, later names overriding earlier ones;
    fstab-only options (``defaults``, ``_netdev``, ``nofail``, ``x-*``...) are dropped; everything else
    (``discard``, ``nouuid``, ``data=ordered``, ``context=...``) goes to the filesystem, comma-joined.
    """
    flags = 0
    data: list[str] = []
    for option in (o.strip() for o in ",".join(options).split(",")):
        if not option or option in _USERSPACE_OPTIONS or option.startswith(_USERSPACE_PREFIXES):
            continue
        if option in _FLAG_OPTIONS:
            bit, on = _FLAG_OPTIONS[option]
            flags = flags | bit if on else flags & ~bit
        else:
            data.append(option)
    return flags, ",".join(data)


def _mount_flags_of(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise MountError(f"cannot read the mount flags of {path}: {exc.strerror}") from exc
    return sum(ms for st_flag, ms in _STATVFS_FLAGS if st.f_flag & st_flag)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    return libc


def _encode(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def _in_thread(call: Callable[[], int], what: str, timeout: float) -> None:
    """Run a mount system call, raising MountError(errno) on failure and after ``timeout`` seconds.

    The call runs in a thread of its own so that a mount stuck in the kernel on dead storage (D state)
    costs that thread only: the caller gets its answer after ``timeout`` and the thread is left behind.
    """
    outcome: list[int] = []

    def call_and_keep_errno() -> None:
        outcome.append(0 if call() == 0 else ctypes.get_errno())

    worker = threading.Thread(target=call_and_keep_errno, name=what, daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise MountError(f"{what} failed: still waiting in the kernel after {timeout:g} s")
    if outcome[0]:
        raise OSError(outcome[0], os.strerror(outcome[0]))


def _mount_call(
    what: str, source: str | None, target: str, fs_type: str | None, flags: int, data: str, timeout: float
) -> None:
    libc = _libc()
    args = (_encode(source), _encode(target), _encode(fs_type), flags, _encode(data) if data else None)
    try:
        _in_thread(lambda: libc.mount(*args), what, timeout)
    except OSError as exc:
        reason = _MOUNT_REASONS.get(exc.errno, exc.strerror)
        raise MountError(f"{what} failed: {reason} ({exc.strerror})", errno=exc.errno) from None


def mount(
    source: str,
    target: str,
    fs_type: str | None = None,
    options: Sequence[str] = (),
    bind: bool = False,
    readonly: bool = False,
    *,
    timeout: float = MOUNT_TIMEOUT,
) -> None:
    """Mount ``source`` (a device, or for ``bind`` a directory or device node) on ``target``.

    ``options`` are mount(8)-style names (see :func:`mount_options`). Not idempotent by itself: mounting
    on a mount point stacks a second mount; callers check :func:`is_mounted` first.

    A filesystem mount that the device refuses as write-protected is made read-only instead, as
    mount(8) does. For a bind mount ``fs_type`` and filesystem options are ignored; read-only and the
    per-mount flags are applied by a second call (a bind remount, which keeps the flags the bind
    inherited, such as ``nosuid``); if that call fails the bind is undone. Note that a read-only mount
    does not stop writes through a *device node*: the kernel checks read-only mounts for files and
    directories only.
    """
    requested = [*options, *(["ro"] if readonly else [])]
    flags, data = mount_options(requested)
    if bind:
        _mount_call(f"bind-mounting {source} on {target}", source, target, None, MS_BIND, "", timeout)
        if flags:
            what = f"applying {','.join(requested)} to the bind mount on {target}"
            try:
                inherited = _mount_flags_of(target)
                _mount_call(what, None, target, None, MS_REMOUNT | MS_BIND | inherited | flags, "", timeout)
            except MountError as exc:
                try:
                    unmount(target, timeout=timeout)
                except MountError as undo:
                    raise MountError(f"{exc}; then {undo}", errno=exc.errno) from exc
                raise
        return
    what = f"mounting {source} on {target}"
    try:
        _mount_call(what, source, target, fs_type, flags, data, timeout)
    except MountError as exc:
        if flags & MS_RDONLY or exc.errno not in (errno.EROFS, errno.EACCES):
            raise
        _LOG.warning("%s is write-protected: mounting it read-only on %s", source, target)
        _mount_call(what + " read-only", source, target, fs_type, flags | MS_RDONLY, data, timeout)


def unmount(target: str, *, timeout: float = MOUNT_TIMEOUT) -> None:
    """Unmount the topmost mount at ``target``; a no-op when nothing is mounted there (or it does not exist)."""
    if not is_mounted(target):
        return
    libc = _libc()
    path = _encode(target)
    what = f"unmounting {target}"
    try:
        _in_thread(lambda: libc.umount2(path, 0), what, timeout)
    except OSError as exc:
        reason = _UNMOUNT_REASONS.get(exc.errno, exc.strerror)
        raise MountError(f"{what} failed: {reason} ({exc.strerror})", errno=exc.errno) from None


# --- paths, ownership, statistics --------------------------------------------------------------------


def ensure_dir(path: str, mode: int = 0o750) -> None:
    """Create directory ``path`` (and its parents) when missing; MountError when something else is there."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError as exc:
        raise MountError(f"cannot create directory {path}: a non-directory is in the way") from exc
    except OSError as exc:
        raise MountError(f"cannot create directory {path}: {exc.strerror}") from exc


def ensure_file(path: str, mode: int = 0o640) -> None:
    """Create an empty file at ``path`` (parents too) when missing: the target of a raw block publish.

    An existing regular file, or a device node already bind-mounted there, is left as it is.
    """
    ensure_dir(os.path.dirname(os.path.abspath(path)))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    except FileExistsError:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise MountError(f"cannot use {path} as a file: {exc.strerror}") from exc
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise MountError(f"cannot create file {path}: something other than a file is in the way") from None
        return
    except OSError as exc:
        raise MountError(f"cannot create file {path}: {exc.strerror}") from exc
    os.close(fd)


def apply_group(path: str, gid: int) -> None:
    """Give the group ``gid`` (a volume_mount_group / fsGroup) access to the root of a mounted volume.

    Sets the group of ``path`` to ``gid``, and adds group read-write (plus search on a directory) and, on
    a directory, the setgid bit so new files inherit the group, as kubelet does for fsGroup. Only ``path``
    itself changes: a recursive change of the existing tree is kubelet's job (fsGroupPolicy ``File``),
    and a freshly formatted volume has nothing else in it.
    """
    if gid < 0:
        raise ValueError(f"invalid group id {gid}")
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise MountError(f"refusing to change the group of {path}: it is a symbolic link")
        os.chown(path, -1, gid, follow_symlinks=False)
        mode = stat.S_IMODE(st.st_mode) | stat.S_IRGRP | stat.S_IWGRP | stat.S_IRUSR | stat.S_IWUSR
        if stat.S_ISDIR(st.st_mode):
            mode |= stat.S_ISGID | stat.S_IXGRP | stat.S_IXUSR
        os.chmod(path, mode)
    except OSError as exc:
        raise MountError(f"cannot give group {gid} access to {path}: {exc.strerror}") from exc


def filesystem_stats(path: str) -> FilesystemStats:
    """Bytes and inodes of the filesystem holding ``path``, as ``df`` computes them from statvfs.

    ``bytes_used`` counts all non-free blocks, ``bytes_available`` what an unprivileged user may still
    use (so used + available can be below total when blocks are reserved). btrfs reports 0 inodes.
    """
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise MountError(f"cannot read filesystem statistics of {path}: {exc.strerror}") from exc
    return FilesystemStats(
        bytes_total=st.f_blocks * st.f_frsize,
        bytes_used=(st.f_blocks - st.f_bfree) * st.f_frsize,
        bytes_available=st.f_bavail * st.f_frsize,
        inodes_total=st.f_files,
        inodes_used=st.f_files - st.f_ffree,
        inodes_free=st.f_ffree,
    )
