"""Running the host's tools (util-linux, the filesystems' tools) for the node.

Every external command runs with a list argv (never a shell), ``LC_ALL=C``, stdin from /dev/null and a
timeout; a failure raises :class:`MountError` naming what failed, the command and its (trimmed) stderr.
Standard library only: the node role must start fast and stay small.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence

from mbs_csi.node.mount_error import MountError

# Seconds: the bound for commands that are quick unless the storage is in trouble (probing, losetup).
QUICK_TIMEOUT = 60.0

# After killing a timed-out command, how long to wait for it to exit. A process stuck in the kernel on
# dead storage (D state) does not die: it is left behind rather than blocking the caller forever.
_KILL_WAIT = 5.0
_OUTPUT_LIMIT = 1000


def trim_output(text: str) -> str:
    """A command's output on one line, its last 1000 characters at most: fit for an error message."""
    text = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= _OUTPUT_LIMIT else "..." + text[-_OUTPUT_LIMIT:]


def run(
    argv: Sequence[str], what: str, timeout: float, ok_codes: Sequence[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; return the result when its exit code is in ``ok_codes``, else raise MountError."""
    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",
            env=env,
        )
    except OSError as exc:
        raise MountError(f"{what} failed: cannot run {argv[0]}: {exc.strerror}", command=argv) from exc
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        # A command stuck in the kernel does not die: leave it (Popen reaps it later if it ever exits).
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=_KILL_WAIT)
        raise MountError(f"{what} failed: {' '.join(argv)} timed out after {timeout:g} s", command=argv) from exc
    if proc.returncode not in ok_codes:
        err = trim_output(stderr) or trim_output(stdout)
        raise MountError(
            f"{what} failed: {' '.join(argv)} exited with code {proc.returncode}: {err or '(no output)'}",
            command=argv,
            returncode=proc.returncode,
            stderr=err,
        )
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)
