"""Mounting and unmounting: mount(2) and umount2(2) system calls, bounded by a timeout.

Mounts and unmounts are system calls, not mount(8) and umount(8) processes: a node stages and
publishes on every pod start, and a fork and exec of util-linux costs more than the whole kernel call.
The filesystems are those of :mod:`mbs_csi.filesystems`, which need no mount helper. mount(8)'s
option handling is kept (:mod:`mbs_csi.node.mount_options`), and so is its fallback: a write-protected
device is mounted read-only with a warning. A failure raises :class:`MountError` with the reason, in
words a person can act on, and the errno.

Standard library only: the node role must start fast and stay small.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence

from mbs_csi.node import mount_options
from mbs_csi.node.mount_error import MountError
from mbs_csi.node.mount_options import MS_BIND, MS_RDONLY, MS_REMOUNT
from mbs_csi.node.mountinfo import is_mounted

# Seconds. (Un)mounting is quick unless the storage is in trouble.
MOUNT_TIMEOUT = 300.0

_LOG = logging.getLogger(__name__)

# The per-mount flags statvfs(3) reports, as mount flags: what a bind remount must keep.
_STATVFS_FLAGS = (
    (os.ST_RDONLY, MS_RDONLY),
    (os.ST_NOSUID, mount_options.MS_NOSUID),
    (os.ST_NODEV, mount_options.MS_NODEV),
    (os.ST_NOEXEC, mount_options.MS_NOEXEC),
    (os.ST_SYNCHRONOUS, mount_options.MS_SYNCHRONOUS),
    (os.ST_MANDLOCK, mount_options.MS_MANDLOCK),
    (os.ST_NOATIME, mount_options.MS_NOATIME),
    (os.ST_NODIRATIME, mount_options.MS_NODIRATIME),
    (os.ST_RELATIME, mount_options.MS_RELATIME),
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
        reason = _MOUNT_REASONS.get(exc.errno or 0, exc.strerror)
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

    ``options`` are mount(8)-style names (see :func:`mount_options.parse`). Not idempotent by itself:
    mounting on a mount point stacks a second mount; callers check :func:`mountinfo.is_mounted` first.

    A filesystem mount that the device refuses as write-protected is made read-only instead, as
    mount(8) does. For a bind mount ``fs_type`` and filesystem options are ignored; read-only and the
    per-mount flags are applied by a second call (a bind remount, which keeps the flags the bind
    inherited, such as ``nosuid``); if that call fails the bind is undone. Note that a read-only mount
    does not stop writes through a *device node*: the kernel checks read-only mounts for files and
    directories only.
    """
    requested = [*options, *(["ro"] if readonly else [])]
    flags, data = mount_options.parse(requested)
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
        reason = _UNMOUNT_REASONS.get(exc.errno or 0, exc.strerror)
        raise MountError(f"{what} failed: {reason} ({exc.strerror})", errno=exc.errno) from None
