"""The backend worker pool under kills, through the real ``mbs-csi`` process on the loopback backend: a
worker killed under a call fails that call at once (and never hands it another call's answer), and the
workers die with the front however it dies."""

from __future__ import annotations

import collections
import ctypes
import os
import re
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from testkit.controller import ControllerUnderTest
from testkit.csi_requests import GIB, create_request
from testkit.wait import wait_until

Code = grpc.StatusCode
pytestmark = pytest.mark.slow

WORKERS = 4
KILL_ROUNDS = 10  # of half the workers each
CALL_TIMEOUT = 120  # the gRPC deadline of each call: a stuck call shows as DEADLINE_EXCEEDED first
BACKEND_TIMEOUT = 60  # the driver's backend_timeout, for a call whose worker hangs


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that can still run (a zombie is dead, only not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def cpu_ticks(pid: int) -> int:
    """User and system CPU time of ``pid`` so far, in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return int(fields[11]) + int(fields[12])


def has_unread_input(pid: int) -> bool:
    """Whether a unix socket of ``pid`` holds bytes it has not read (a request sent to a stopped worker)."""
    out = subprocess.run(["ss", "-xpH"], capture_output=True, text=True, check=True).stdout
    return any(f"pid={pid}," in line and int(line.split()[2]) > 0 for line in out.splitlines())


def hold_socket_of(worker: int) -> int:
    """A copy, in this process, of the worker's end of its socket to the front (``pidfd_getfd``), as a
    child that a driver forked without closing its descriptors would hold: the worker's death then
    leaves its socket open, and the front sees no end of file."""
    argv = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
    fd = int(argv[3])  # python -c BOOT FD ...
    pidfd = os.pidfd_open(worker)
    try:
        held = ctypes.CDLL(None, use_errno=True).syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd
    finally:
        os.close(pidfd)
    if held < 0:
        raise OSError(ctypes.get_errno(), f"pidfd_getfd of fd {fd} of process {worker}")
    return held


def test_a_call_fails_over_at_once_when_its_worker_dies_and_its_socket_stays_open():
    """A worker's death is learnt from its watcher, not only from the end of its socket (which a process
    the worker forked may keep open), and the call in flight then fails over to another worker at once.
    Before, the watcher closed the socket under the waiting call and the replacement's socket took its
    number: the call waited out backend_timeout holding its volume's lock, or read the new worker's
    greeting or another call's answer."""
    ctl = ControllerUnderTest(None, extra={"backend_workers": 1, "backend_timeout": BACKEND_TIMEOUT})
    held = None
    try:
        volume_id = ctl.stub.CreateVolume(create_request("failover")).volume.volume_id
        (worker,) = wait_until(ctl.ready_worker_pids, 120, "a ready worker")
        os.kill(worker, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as caller:
            call = caller.submit(
                ctl.stub.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=volume_id), timeout=CALL_TIMEOUT
            )
            wait_until(lambda: has_unread_input(worker), 60, "the call to reach the stopped worker")
            held = hold_socket_of(worker)
            os.kill(worker, signal.SIGKILL)
            try:
                answer = call.result()
            except grpc.RpcError as exc:
                raise AssertionError(f"{exc.code().name}: {exc.details()}") from None
        assert answer.volume.volume_id == volume_id
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    finally:
        if held is not None:
            os.close(held)
        ctl.close()


def test_killing_busy_workers_fails_their_calls_at_once_and_never_crosses_answers():
    """Kill half the workers at once, again and again, while 16 clients keep them busy: each call answers
    with its own result or UNAVAILABLE (retried once on another worker first), never with what another
    call or a starting worker sent, and never waits out backend_timeout on a dead worker (holding its
    volume's lock, so that retries answer ABORTED)."""
    ctl = ControllerUnderTest(None, extra={"backend_workers": WORKERS, "backend_timeout": BACKEND_TIMEOUT})
    try:
        volumes = [ctl.stub.CreateVolume(create_request(f"pool-{i}")).volume.volume_id for i in range(4 * WORKERS)]
        stop = threading.Event()
        answered: collections.Counter[str] = collections.Counter()
        wrong: list[str] = []
        killed: set[int] = set()

        def client(volume_id: str) -> None:
            request = pb.ControllerGetVolumeRequest(volume_id=volume_id)
            while not stop.is_set():
                try:
                    got = ctl.stub.ControllerGetVolume(request, timeout=CALL_TIMEOUT).volume.volume_id
                except grpc.RpcError as exc:
                    if exc.code() != Code.UNAVAILABLE:
                        wrong.append(f"{volume_id}: {exc.code().name} {exc.details()}")
                    answered[exc.code().name] += 1
                    continue
                if got != volume_id:
                    wrong.append(f"{volume_id}: answered with volume {got}")
                answered["OK"] += 1

        with ThreadPoolExecutor(len(volumes)) as clients:
            running = [clients.submit(client, volume_id) for volume_id in volumes]
            try:
                for round_ in range(KILL_ROUNDS):
                    ready = wait_until(
                        lambda: len(live := [p for p in ctl.ready_worker_pids() if alive(p)]) == WORKERS and live,
                        120,
                        lambda: f"{WORKERS} ready workers; the driver's log:\n{ctl.driver.log()[-5000:]}",
                    )
                    calls_before = answered.total()
                    wait_until(
                        lambda before=calls_before: answered.total() > before, 120, "calls answered between kills"
                    )
                    now = ready[round_ % 2 :: 2]  # all busy: 16 clients keep 4 workers so
                    for pid in now:
                        killed.add(pid)
                        os.kill(pid, signal.SIGKILL)
                    # A killed process shows as running until it has left the CPU (tens of ms on a loaded
                    # machine): the next round must not take these for the other half.
                    wait_until(lambda now=now: not any(alive(pid) for pid in now), 60, "the killed workers to die")
            finally:
                stop.set()
                for future in running:
                    future.result()
        assert not wrong, wrong
        assert answered["OK"] > 0
        pattern = r"backend worker (\d+) exited with|backend worker died during \S+ \(worker (\d+) died"
        died = {int(a or b) for a, b in re.findall(pattern, ctl.driver.log())}
        assert died <= killed, f"workers the test did not kill died too: {sorted(died - killed)}"
        for volume_id in volumes:  # no call holds a volume's lock any more: each answers, none ABORTED
            grown = ctl.stub.ControllerExpandVolume(
                pb.ControllerExpandVolumeRequest(
                    volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=GIB)
                )
            )
            assert grown.capacity_bytes == GIB
            ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    finally:
        ctl.close()


def kill_the_front(ctl: ControllerUnderTest) -> None:
    """Kill -9 the front alone, not its process group: as the OOM killer does."""
    os.kill(ctl.driver.proc.pid, signal.SIGKILL)
    ctl.driver.proc.wait(60)


def assert_gone(workers: list[int]) -> None:
    assert workers
    try:
        wait_until(lambda: not any(alive(pid) for pid in workers), 60, "the workers to die with the front")
    except AssertionError:
        spinning = {pid: cpu_ticks(pid) for pid in workers if alive(pid)}
        raise AssertionError(f"workers left behind by the killed front (pid: CPU ticks so far): {spinning}") from None


def test_workers_die_with_the_front_while_one_starts_and_one_idles():
    ctl = ControllerUnderTest(None, extra={"backend_workers": 2})
    try:
        wait_until(lambda: len(ctl.ready_worker_pids()) == 2, 120, "2 ready workers")
        idle, killed = ctl.ready_worker_pids()
        os.kill(killed, signal.SIGKILL)  # the front starts a replacement at once
        starting = wait_until(
            lambda: [pid for pid in ctl.worker_pids() if pid not in (idle, killed)], 60, "a replacement worker"
        )
        kill_the_front(ctl)
        assert_gone([idle, *starting])
    finally:
        ctl.close()


def test_a_busy_worker_dies_with_the_front():
    ctl = ControllerUnderTest(None, extra={"backend_workers": 1})
    try:
        (worker,) = wait_until(ctl.ready_worker_pids, 120, "a ready worker")
        os.kill(worker, signal.SIGSTOP)  # a backend call that takes its time
        with ThreadPoolExecutor(1) as caller:
            call = caller.submit(ctl.stub.CreateVolume, create_request("busy-at-the-front-s-death"), timeout=120)
            wait_until(lambda: has_unread_input(worker), 60, "the call to reach the stopped worker")
            try:
                kill_the_front(ctl)
            finally:
                os.kill(worker, signal.SIGCONT)  # it runs the call, and answers a front that is gone
            with pytest.raises(grpc.RpcError):
                call.result()
        assert_gone([worker])
    finally:
        ctl.close()
