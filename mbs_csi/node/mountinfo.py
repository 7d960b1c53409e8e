"""The mount table as the kernel shows it (``/proc/self/mountinfo``): what is mounted where, from which
device.

Standard library only: the node role must start fast and stay small.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``, with octal escapes (``\\040`` ...) decoded.

    ``source`` is the mount source (``/dev/loop3`` for a block filesystem, ``devtmpfs`` for a device node
    bind-mounted from /dev); ``root`` is the path within that filesystem that is mounted: ``/`` for a
    whole filesystem, ``/some/dir`` for a bind mount of a directory, ``/loop3`` for a bind mount of the
    device node /dev/loop3. A bind mount of a directory shows the source *filesystem*: its ``source`` is
    the device (``/dev/loop3``) and ``root`` says which directory. ``mount_options`` are this mount's own
    (``ro`` there means this mount, not just its superblock, is read-only).
    """

    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    fs_type: str
    source: str


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
    """Parse one line of ``/proc/<pid>/mountinfo`` (proc(5)): optional fields end at the ``-`` separator."""
    fields = line.split()
    sep = fields.index("-", 6)
    return MountEntry(
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        mount_options=tuple(fields[5].split(",")),
        fs_type=_unescape(fields[sep + 1]),
        source=_unescape(fields[sep + 2]),
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

    For a device node bind-mounted onto a file (raw block publish), the device of that node
    (``/dev/loop3``), although mountinfo shows the filesystem holding the node (``devtmpfs``, root
    ``/loop3``); for a filesystem or a bind mount of a directory within it, the mount source when it is
    a ``/dev/`` path.
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
