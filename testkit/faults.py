"""Faults a controller under test suffers in the fault tests: kill -9 of its front, of one backend worker
(idle, starting or busy), of its whole process group; and the restart that follows, as a supervisor
(kubelet, systemd) does it.

A worker is *busy copying* when it, or a command it started (``cp``), holds a ``.tmp-*`` file of the
loopback backend open: a volume create, clone or snapshot copy in progress. A worker is *starting*
until the front logs it ready. (A worker is *idle* when no call is in flight: see testkit.sidecar.Gate.)
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from testkit.audit import Audit
from testkit.controller import ControllerUnderTest
from testkit.driver import Driver

EXIT_GRACE = 15.0  # seconds the processes of a killed front may take to exit on their own


def process_parents() -> dict[int, int]:
    """pid -> parent pid of every process now."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return parents


def _holds_temp_file(pid: int, loopback_dir: Path) -> bool:
    prefix = f"{loopback_dir}/.tmp-"
    with contextlib.suppress(OSError):
        for fd in (Path(f"/proc/{pid}/fd")).iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(prefix):
                    return True
    return False


def copying_workers(ctl: ControllerUnderTest) -> list[int]:
    """The workers of the running front that are copying a volume or snapshot now."""
    parents = process_parents()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    return [
        worker
        for worker in children.get(ctl.driver.proc.pid, [])
        if any(_holds_temp_file(pid, ctl.loopback) for pid in [worker, *children.get(worker, [])])
    ]


def starting_workers(ctl: ControllerUnderTest) -> list[int]:
    """The workers of the running front that have not finished starting."""
    return sorted(pid for pid in set(ctl.worker_pids()) - set(ctl.ready_worker_pids()) if _live(pid))


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def kill_front(ctl: ControllerUnderTest) -> Driver:
    """kill -9 the front process alone, as the OOM killer does; return the dead driver."""
    killed = ctl.driver
    kill(killed.proc.pid)
    killed.proc.wait(60)
    return killed


def kill_group(ctl: ControllerUnderTest) -> Driver:
    """kill -9 the front's whole process group (the front, its workers, their commands), as a container
    runtime stopping the pod does; return the dead driver."""
    killed = ctl.driver
    with contextlib.suppress(ProcessLookupError):
        os.killpg(killed.proc.pid, signal.SIGKILL)  # a session leader: its pid names its group
    killed.proc.wait(60)
    return killed


def restart(ctl: ControllerUnderTest, killed: Driver, audit: Audit, restarts: int) -> None:
    """Audit what the killed driver left running, then start the controller again on the same state.
    The killed driver's log is kept beside the new one, as ``driver-<restarts>.log``."""
    audit.processes_left(killed.tree.tag, EXIT_GRACE, f"after the kill of front {killed.proc.pid}")
    killed.close()
    killed.log_path.rename(killed.log_path.with_name(f"driver-{restarts}.log"))
    ctl.start()


def _live(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead and not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
