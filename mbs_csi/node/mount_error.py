"""The error of the node's host operations: commands (blkid, mkfs, resize), mount system calls, paths.

A :class:`MountError` says what failed and, for a command, the command and its (trimmed) stderr, for a
system call the reason and the errno. It answers INTERNAL with its message, as every
:class:`mbs_csi.errors.Internal` does.
"""

from __future__ import annotations

from collections.abc import Sequence

from mbs_csi import errors


class MountError(errors.Internal):
    """A filesystem or mount operation failed; the message says what and includes the command's stderr."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
        errno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.command = tuple(command)
        self.returncode = returncode
        self.stderr = stderr
        self.errno = errno  # set when a system call failed (mount, umount)
