"""Whether a staged volume is still as the attachment store records it: its device present, and for a
mount volume, mounted at its staging path. Pure checks against the kernel, shared by the Node service
(volume condition) and ``mbs-csi node attachments``.
"""

from __future__ import annotations

import os

from mbs_csi.node.devices import block_device_size
from mbs_csi.node.mount_error import MountError
from mbs_csi.node.mountinfo import mounted_device
from mbs_csi.node.store import Attachment


def inspect(staged: Attachment) -> tuple[str | None, int]:
    """(Why a staged volume is not as recorded, or None when it is; its device's size in bytes, 0 if gone.)"""
    device = staged.device_path
    # A device node can outlive its device (a detached loop device keeps /dev/loopN): no capacity is gone too.
    size = _size_or_zero(device) if os.path.exists(device) else 0
    if size == 0:
        return f"device {device} is gone", 0
    if staged.access_type == "mount" and mounted_device(staged.staging_path) != os.path.realpath(device):
        return f"{staged.staging_path} no longer has {device} mounted", size
    return None, size


def attachment_problem(staged: Attachment) -> str | None:
    """Why a staged volume is not as recorded (device gone, mount vanished), or None when it is."""
    return inspect(staged)[0]


def _size_or_zero(device: str) -> int:
    try:
        return block_device_size(device)
    except MountError:
        return 0
