"""How full a mounted volume is: the numbers ``df`` shows, from statvfs(3).

Standard library only: the node role must start fast and stay small.
"""

from __future__ import annotations

import os
from typing import TypedDict

from mbs_csi.node.mount_error import MountError


class FilesystemStats(TypedDict):
    """What :func:`filesystem_stats` returns: the numbers ``df`` shows (bytes and inodes)."""

    bytes_total: int
    bytes_used: int
    bytes_available: int
    inodes_total: int
    inodes_used: int
    inodes_free: int


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
