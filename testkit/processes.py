"""Process trees that never outlive a run.

Every command the harness starts runs in a session of its own (so its process group holds its
descendants) and carries two environment variables that its descendants inherit: ``TREE_VAR``, one value
per started command, and ``RUN_VAR``, one value per test session or benchmark run. Killing a tree kills
its group and then every process still carrying its tag, so a descendant that left the group (``setsid``,
a daemon) or whose parent died is found too. The test session's end checks, by ``RUN_VAR``, that nothing
it started is left; processes of other runs on the machine carry other values and are never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testkit.wait import WaitTimeout, wait_until

RUN_VAR = "MBS_TESTKIT_RUN"
TREE_VAR = "MBS_TESTKIT_TREE"
KILL_TIMEOUT = 60.0  # a process in uninterruptible sleep (a loop device, a mount) dies when it leaves it


def start_run() -> str:
    """Tag this process, and everything it starts from now on, as one new run; return the run's id."""
    os.environ[RUN_VAR] = uuid.uuid4().hex
    return os.environ[RUN_VAR]


def tagged(var: str, value: str) -> list[int]:
    """Live processes (zombies have no environment) other than this one whose environment holds var=value."""
    needle = f"{var}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def describe(pid: int) -> str:
    """``pid`` and its command line, for a message."""
    try:
        argv = (Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0") or b"?").replace(b"\0", b" ")
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} {argv.decode(errors='replace')[:300]}"


def survivors(var: str, value: str, grace: float) -> list[str]:
    """The processes tagged var=value still there after up to ``grace`` seconds (those exiting on their
    own get the time to), described."""
    with contextlib.suppress(WaitTimeout):
        wait_until(lambda: not tagged(var, value), grace, "")
    return [describe(pid) for pid in tagged(var, value)]


def kill_tagged(var: str, value: str) -> None:
    """SIGKILL every process tagged var=value, until none is left."""

    def none_left() -> bool:
        for pid in tagged(var, value):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not tagged(var, value)

    wait_until(none_left, KILL_TIMEOUT, lambda: f"{var}={value} to die: {[describe(p) for p in tagged(var, value)]}")


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, ``timeout``) into ``SystemExit``, so that a benchmark's ``finally`` blocks
    stop the drivers and clusters it started instead of leaving them running."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


class ProcessTree:
    """``argv`` started in a session of its own, tagged: :meth:`kill` stops it and all its descendants."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, **popen: Any) -> None:
        self.tag = uuid.uuid4().hex
        environment = dict(os.environ if env is None else env)
        environment[TREE_VAR] = self.tag
        if RUN_VAR in os.environ:
            environment[RUN_VAR] = os.environ[RUN_VAR]
        self.proc: subprocess.Popen[Any] = subprocess.Popen(
            list(argv), env=environment, start_new_session=True, **popen
        )

    def kill(self) -> None:
        if self.proc.returncode is None:  # not reaped yet: its pid still names its process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(KILL_TIMEOUT)
        kill_tagged(TREE_VAR, self.tag)


def run_tree(
    argv: Sequence[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Like ``subprocess.run(capture_output=True, text=True)``, but the command and anything it started
    are gone when this returns, also when it times out."""
    tree = ProcessTree(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        stdout, stderr = tree.proc.communicate(timeout=timeout)
    finally:
        tree.kill()
    return subprocess.CompletedProcess(tree.proc.args, tree.proc.returncode, stdout, stderr)
