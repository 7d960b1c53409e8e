"""Growing a mounted filesystem, online, to fill its device, with the tool :mod:`mbs_csi.filesystems`
names for its type.

Standard library only: the node role must start fast and stay small.
"""

from __future__ import annotations

from mbs_csi import errors, filesystems
from mbs_csi.node.commands import run
from mbs_csi.node.mount_error import MountError

# Seconds: an online resize of a large volume on remote storage can take minutes.
RESIZE_TIMEOUT = 1800.0


def resize_filesystem(device: str, mount_point: str, fs_type: str, *, timeout: float = RESIZE_TIMEOUT) -> None:
    """Grow the filesystem mounted at ``mount_point`` (from ``device``) to fill the device, online.

    The device must already show its new size (os-brick's extend, ``losetup -c``...). Raises ValueError
    for a filesystem :mod:`mbs_csi.filesystems` does not list, FailedPrecondition when the tool is denied
    a privilege the filesystem needs to grow online, MountError when it fails otherwise.
    """
    filesystem = filesystems.lookup(fs_type)
    argv = filesystem.grow_argv(device, mount_point)
    try:
        run(argv, f"resizing the {fs_type} filesystem on {device} at {mount_point}", timeout)
    except MountError as exc:
        if filesystem.grow_denied_hint and "Permission denied" in exc.stderr:
            # Not a fault of the driver: the node plugin lacks a privilege; kubelet's retries cannot help.
            raise errors.FailedPrecondition(f"{exc} ({filesystem.grow_denied_hint})") from None
        raise
