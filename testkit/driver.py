"""The real ``mbs-csi`` command as a subprocess, talked to over its real socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from csi import csi_pb2, csi_pb2_grpc
from testkit.host import REPO, short_tmpdir
from testkit.processes import ProcessTree, run_tree
from testkit.wait import wait_until

START_TIMEOUT = 60.0  # to serving, or to ready: generous, for a loaded machine
# A channel that failed to connect waits out gRPC's reconnect backoff (1 s, growing to 120 s) before it
# tries again; the driver's own channel retries within a second instead, should the driver restart.
# (Not grpc.min_reconnect_backoff_ms: gRPC also takes it as the minimum connect timeout, and a 100 ms
# handshake deadline fails on a loaded machine.)
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def driver_env(**extra: str) -> dict[str, str]:
    """The environment for a driver subprocess: ours minus any MBS_CSI_*/CSI_ENDPOINT, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MBS_CSI_", "CSI_ENDPOINT"))}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``mbs-csi ARGS`` to completion; whatever it started (backend workers) is gone afterwards."""
    return run_tree([sys.executable, "-m", "mbs_csi", *args], timeout, env=env or driver_env(), cwd=REPO)


class Driver:
    """A running ``mbs-csi serve`` with its log captured to a file."""

    def __init__(
        self, args: list[str], workdir: Path, env: dict[str, str] | None = None, target: str | None = None
    ) -> None:
        self.workdir = workdir
        self.socket = workdir / "csi.sock"
        self.target = target or f"unix://{self.socket}"
        self.log_path = workdir / "driver.log"
        self.args = ["serve", "--endpoint", self.target, *args]
        if "--state-dir" not in args:
            self.args += ["--state-dir", str(workdir / "state")]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.tree = ProcessTree(
            [sys.executable, "-m", "mbs_csi", *self.args],
            env or driver_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.proc = self.tree.proc
        self.channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        """The target as gRPC spells it."""
        return self.target.removeprefix("tcp://")

    def _answers(self) -> bool:
        """Whether GetPluginInfo answers, on a channel of its own: a failed attempt leaves no backoff behind."""
        if self.proc.poll() is not None:
            raise AssertionError(f"driver exited with {self.proc.returncode}:\n{self.log()}")
        if self.target.startswith("unix://") and not self.socket.exists():
            return False
        with grpc.insecure_channel(self.address) as channel:
            try:
                csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
            except grpc.RpcError:
                return False
        return True

    def wait_serving(self, timeout: float = START_TIMEOUT) -> Driver:
        """Wait until GetPluginInfo answers; fail with the driver's log if it exits first."""
        wait_until(self._answers, timeout, lambda: f"the driver to serve; its log:\n{self.log()}")
        self.channel = grpc.insecure_channel(self.address, options=FAST_RECONNECT)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Driver:
        """Wait until Probe answers ready (a controller is not ready until a backend worker is up); a
        channel still in its reconnect backoff after a restart counts as not ready yet."""

        def ready() -> bool:
            try:
                return self.probe()
            except grpc.RpcError:
                return False

        wait_until(ready, timeout, lambda: f"Probe to answer ready; the driver's log:\n{self.log()}", 0.2)
        return self

    def wait_logged(self, text: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``text`` appears in the driver's log."""
        wait_until(lambda: text in self.log(), timeout, lambda: f"{text!r} in the driver's log:\n{self.log()}")

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        assert self.channel is not None
        return csi_pb2_grpc.IdentityStub(self.channel)

    def probe(self) -> bool:
        return self.identity.Probe(csi_pb2.ProbeRequest(), timeout=30).ready.value

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the front process (it stops its workers itself) and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Kill the driver and every process it started, then release the channel and the log."""
        if self.channel is not None:
            self.channel.close()
        self.tree.kill()
        self._log.close()


@contextlib.contextmanager
def running_driver(*args: str, env: dict[str, str] | None = None, workdir: Path | None = None) -> Iterator[Driver]:
    own = workdir is None
    workdir = workdir or short_tmpdir()
    driver = Driver(list(args), workdir, env)
    try:
        yield driver.wait_serving()
    finally:
        driver.close()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
