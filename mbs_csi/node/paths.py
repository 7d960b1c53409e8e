"""The paths the node mounts on and hands to pods: mount targets made ready, and the group access of a
mounted volume's root (volume_mount_group / fsGroup).

Standard library only: the node role must start fast and stay small.
"""

from __future__ import annotations

import os
import stat

from mbs_csi.node.mount_error import MountError


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
