"""The filesystems the driver supports: one table, read by the controller's capability check (what
``fs_type`` a volume may ask for) and by the node (how to format and grow each one).

Supported means what the driver formats, mounts, grows and advertises: ext4, xfs and btrfs, none of
which needs a mount helper. ext2 and ext3 are not listed, and need not be for volumes formatted
elsewhere: an ``fs_type`` is checked against this table before the node stages a volume and records
it, so no staged volume can name another type, and the kernel's ext4 driver mounts ext2 and ext3
filesystems, so such a volume is staged as ``ext4`` and grown with resize2fs like any ext4.

Standard library only: the node role imports this and must start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Filesystem:
    """How the driver makes and grows one filesystem type."""

    mkfs: tuple[str, ...]  # argv without the device, which comes last
    grow: tuple[str, ...]  # argv without its target, which comes last
    grow_target: Literal["device", "mount_point"]  # what the grow command is given
    grow_denied_hint: str = ""  # added to the error when growing fails with "Permission denied"

    def mkfs_argv(self, device: str) -> list[str]:
        return [*self.mkfs, device]

    def grow_argv(self, device: str, mount_point: str) -> list[str]:
        return [*self.grow, device if self.grow_target == "device" else mount_point]


# Options chosen for fresh volumes that may be large and thinly provisioned (as ceph-csi does):
# no discard pass over the whole device, lazy inode-table and journal initialisation, and for ext4 no
# blocks reserved for root (kubelet's mount-utils uses -m0 too). mkfs.xfs and mkfs.btrfs refuse an
# existing filesystem on their own (no -f is passed); mkfs.ext4 does not, hence the node's signature
# check before formatting. Growing is online: resize2fs takes the device, xfs_growfs and btrfs the
# mount point.
FILESYSTEMS: dict[str, Filesystem] = {
    "ext4": Filesystem(
        mkfs=("mkfs.ext4", "-F", "-q", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"),
        grow=("resize2fs",),
        grow_target="device",
        # The kernel refuses EXT4_IOC_RESIZE_FS with EPERM without CAP_SYS_RESOURCE.
        grow_denied_hint="online ext4 resize needs the CAP_SYS_RESOURCE capability",
    ),
    "xfs": Filesystem(mkfs=("mkfs.xfs", "-q", "-K"), grow=("xfs_growfs", "-d"), grow_target="mount_point"),
    "btrfs": Filesystem(
        mkfs=("mkfs.btrfs", "-q", "-K"), grow=("btrfs", "filesystem", "resize", "max"), grow_target="mount_point"
    ),
}
DEFAULT = "ext4"  # the fs_type of a mount volume that names none


def lookup(fs_type: str) -> Filesystem:
    """The table's entry for ``fs_type``; ValueError naming the supported types for any other."""
    try:
        return FILESYSTEMS[fs_type]
    except KeyError:
        raise ValueError(f"unsupported filesystem {fs_type!r}: use one of {', '.join(FILESYSTEMS)}") from None
