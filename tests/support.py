"""Helpers to run the real ``mbs-csi`` command as a subprocess and talk to it over its real socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from csi import csi_pb2, csi_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def short_tmpdir(prefix: str = "mbs-") -> Path:
    """A fresh directory under /tmp: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def driver_env(**extra: str) -> dict[str, str]:
    """The environment for a driver subprocess: ours minus any MBS_CSI_*/CSI_ENDPOINT, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MBS_CSI_", "CSI_ENDPOINT"))}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mbs_csi", *args],
        env=env or driver_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


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
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mbs_csi", *self.args],
            env=env or driver_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.channel: grpc.Channel | None = None

    def wait_serving(self, timeout: float = 30) -> Driver:
        """Wait until GetPluginInfo answers; fail with the driver's log if it exits first."""
        self.channel = grpc.insecure_channel(self.target.removeprefix("tcp://"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"driver exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=1)
                return self
            except grpc.RpcError:
                time.sleep(0.05)
        raise AssertionError(f"driver not serving after {timeout}s:\n{self.log()}")

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
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
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
