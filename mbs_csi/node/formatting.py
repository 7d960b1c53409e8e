"""Formatting a device, only when it is blank.

:func:`format_device` refuses a device that carries *any* signature blkid knows (filesystem, partition
table, swap, LUKS, LVM, RAID member...), because ``mkfs.ext4`` itself overwrites an existing filesystem
without asking when stdin is not a terminal, and one whose first MiB holds anything but zeros (data
without a signature: a new volume reads as zeros). Data is never reformatted. The mkfs commands are those of
:mod:`mbs_csi.filesystems`.

Standard library only: the node role must start fast and stay small.
"""

from __future__ import annotations

from mbs_csi import filesystems
from mbs_csi.node.commands import run
from mbs_csi.node.devices import probe, reads_as_zeros
from mbs_csi.node.mount_error import MountError

# Seconds: mkfs of a large volume on remote storage can take minutes.
MKFS_TIMEOUT = 1800.0
# Bytes at the start of a device that must read as zeros for it to count as blank.
BLANK_PREFIX = 1024**2


class NotBlankError(MountError):
    """:func:`format_device` refused a device that is not blank; ``filesystem`` is what blkid found on it."""

    def __init__(self, device: str, fs_type: str, filesystem: str | None, partition_table: str | None) -> None:
        found = filesystem or (f"partition table {partition_table}" if partition_table else "data")
        super().__init__(f"refusing to format {device} as {fs_type}: it already carries {found}")
        self.filesystem = filesystem


def format_device(device: str, fs_type: str, *, timeout: float = MKFS_TIMEOUT) -> None:
    """Make a ``fs_type`` filesystem on ``device``, which must be blank.

    Raises ValueError for a filesystem :mod:`mbs_csi.filesystems` does not list, :class:`NotBlankError`
    when the device carries any signature (nothing is written then), and MountError when probing or mkfs
    fails.
    """
    filesystem = filesystems.lookup(fs_type)
    values = probe(device)  # raises on an ambivalent result: several signatures
    if any(values.get(key) for key in ("TYPE", "PTTYPE", "USAGE")) or not reads_as_zeros(device, BLANK_PREFIX):
        raise NotBlankError(device, fs_type, values.get("TYPE") or None, values.get("PTTYPE") or None)
    run(filesystem.mkfs_argv(device), f"formatting {device} as {fs_type}", timeout)
