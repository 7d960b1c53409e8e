"""Read-only views of block devices, for read-only raw block publishes.

A read-only bind mount does not stop writes through a device node: the kernel honours a mount's
read-only flag for files, directories and links, not for devices. So a read-only raw block publish
binds a read-only loop device over the staged device (a *view*) instead of the device itself: the
kernel refuses writes to it (EPERM; older kernels refuse to open it for writing, EROFS).

One view per staged device, made by the first read-only publish and shared by the others, and
detached when the volume is unstaged, before the device itself goes. Views are found again in
``/sys/block`` (a loop device's ``ro`` flag and backing file), so a node plugin restarted in between,
or one that died halfway through a publish, finds the view it made rather than leaking another.
"""

from __future__ import annotations

import os
from pathlib import Path

from mbs_csi.node.commands import QUICK_TIMEOUT, run

SYS_BLOCK = Path("/sys/block")


def views(device: str) -> list[str]:
    """The read-only loop devices over ``device``."""
    real = os.path.realpath(device)
    found: list[str] = []
    for loop in sorted(SYS_BLOCK.glob("loop*")):
        try:
            read_only = (loop / "ro").read_text().strip() == "1"
            backing = (loop / "loop" / "backing_file").read_text().strip()
        except OSError:  # not set up, or detached meanwhile
            continue
        if read_only and os.path.realpath(backing) == real:
            found.append(f"/dev/{loop.name}")
    return found


def view(device: str, *, timeout: float = QUICK_TIMEOUT) -> str:
    """A read-only loop device over ``device``: the one there is, or a new one."""
    existing = views(device)
    if existing:
        return existing[0]
    real = os.path.realpath(device)
    made = run(["losetup", "--read-only", "--find", "--show", real], f"making {real} read-only", timeout)
    return made.stdout.strip()


def refresh(device: str, *, timeout: float = QUICK_TIMEOUT) -> None:
    """Give the views of ``device`` its new size, after it grew."""
    for loop in views(device):
        run(["losetup", "--set-capacity", loop], f"resizing the read-only view {loop}", timeout)


def detach(view: str, *, timeout: float = QUICK_TIMEOUT) -> None:
    """Detach one view (a device :func:`views` named)."""
    run(["losetup", "--detach", view], f"detaching the read-only view {view}", timeout)


def release(device: str, *, timeout: float = QUICK_TIMEOUT) -> None:
    """Detach every view of ``device``."""
    for loop in views(device):
        detach(loop, timeout=timeout)
