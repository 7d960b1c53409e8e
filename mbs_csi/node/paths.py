"""The paths the node mounts on and hands to pods: paths from requests checked, publish targets made
ready and removed again (only what may be the driver's: never a symlink, never anything with content),
and the group access of a mounted volume's root (volume_mount_group / fsGroup).

Standard library only: the node role must start fast and stay small.
"""

from __future__ import annotations

import errno
import os
import stat

from mbs_csi import errors
from mbs_csi.node.mount_error import MountError
from mbs_csi.node.mountinfo import is_mounted

NAME_MAX = 255  # bytes in one path component (Linux)
MAX_GID = 2**32 - 2  # (gid_t)-1 means "no change" to chown(2)


def checked(path: str, what: str) -> str:
    """``path`` from a request, normalised (no trailing or doubled ``/``); InvalidArgument unless it is
    absolute, free of NUL bytes and ``.``/``..`` components, and each component fits in NAME_MAX bytes."""
    if "\0" in path:
        raise errors.InvalidArgument(f"{what} must not contain a NUL byte")
    if not path.startswith("/"):
        raise errors.InvalidArgument(f"{what} must be an absolute path, not {path!r}")
    parts = [part for part in path.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise errors.InvalidArgument(f"{what} must not contain . or .. components: {path!r}")
    if any(len(os.fsencode(part)) > NAME_MAX for part in parts):
        raise errors.InvalidArgument(f"{what} has a component longer than {NAME_MAX} bytes")
    return "/" + "/".join(parts)


def is_mount_point(path: str) -> bool:
    """Whether something is mounted at ``path`` itself; a symbolic link at ``path`` is not followed
    (its parents may be links)."""
    return not os.path.islink(path) and is_mounted(path)


def prepare_target(path: str, kind: str) -> bool:
    """Make ``path`` ready for a publish of ``kind`` ("mount": a directory, "block": a file) in its
    existing parent directory (the CO's); True when this call created it.

    An empty directory (or, for block, an empty file) already there is used as it is. FailedPrecondition
    for a missing parent, a symbolic link, the wrong kind of file, or one with content: a mount would
    follow the link or hide what is there.
    """
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise errors.FailedPrecondition(f"the parent directory of {path} does not exist: the CO creates it")
    try:
        if kind == "mount":
            os.mkdir(path, 0o750)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640))
        return True
    except FileExistsError:
        pass
    except OSError as exc:
        raise MountError(f"cannot create {path}: {exc.strerror}") from exc
    _check_empty(path, kind, "refusing to publish there")
    return False


def _check_empty(path: str, kind: str | None, action: str) -> None:
    """FailedPrecondition unless ``path`` is an empty directory or an empty regular file (of ``kind``,
    "mount" for the directory, "block" for the file, when given)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise MountError(f"cannot inspect {path}: {exc.strerror}") from exc
    is_dir, is_file = stat.S_ISDIR(st.st_mode), stat.S_ISREG(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        raise errors.FailedPrecondition(f"{path} is a symbolic link: {action}")
    if not (is_dir or is_file) or (kind == "mount" and not is_dir) or (kind == "block" and not is_file):
        expected = {"mount": "a directory", "block": "a regular file"}.get(kind or "", "a directory or a file")
        raise errors.FailedPrecondition(f"{path} is not {expected}: {action}")
    if (is_dir and os.listdir(path)) or (is_file and st.st_size):
        raise errors.FailedPrecondition(f"{path} is not empty: {action}")


def remove_target(path: str) -> None:
    """Remove a publish target once nothing is mounted there: an empty directory or an empty file, nothing
    else (FailedPrecondition); a missing one is fine."""
    if not os.path.lexists(path):
        return
    _check_empty(path, None, "refusing to remove it")
    try:
        os.rmdir(path) if os.path.isdir(path) else os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise MountError(f"cannot remove {path}: {exc.strerror}") from exc


def ensure_dir(path: str, mode: int = 0o750) -> None:
    """Create directory ``path`` (and its parents) when missing; MountError when something else is there."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError as exc:
        raise MountError(f"cannot create directory {path}: a non-directory is in the way") from exc
    except OSError as exc:
        raise MountError(f"cannot create directory {path}: {exc.strerror}") from exc


def group_id(volume_mount_group: str) -> int | None:
    """The group id a ``volume_mount_group`` names, None when empty; InvalidArgument unless it is a number
    a group id can be."""
    if not volume_mount_group:
        return None
    if not volume_mount_group.isdigit() or int(volume_mount_group) > MAX_GID:
        raise errors.InvalidArgument(
            f"volume_mount_group must be a numeric group id up to {MAX_GID}, not {volume_mount_group!r}"
        )
    return int(volume_mount_group)


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
