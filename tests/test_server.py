"""The server's endpoint handling and shutdown, through the real ``mbs-csi serve`` command."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from csi import csi_pb2, csi_pb2_grpc
from testkit.driver import Driver, run_cli, running_driver
from testkit.host import free_port, short_tmpdir


@pytest.fixture
def workdir():
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unix_socket_is_created_with_mode_0660_and_removed_on_exit(workdir):
    driver = Driver(["--role", "node"], workdir)
    try:
        driver.wait_serving()
        assert stat.S_IMODE(os.stat(driver.socket).st_mode) == 0o660
        assert driver.stop() == 0
    finally:
        driver.close()
    assert not driver.socket.exists()


def test_stale_socket_is_replaced(workdir):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(workdir / "csi.sock"))
    stale.close()  # the file stays, nobody listens: what a killed driver leaves behind
    with running_driver("--role", "node", workdir=workdir) as driver:
        driver.wait_ready()
        assert "removing stale socket" in driver.log()


def test_live_socket_is_a_clear_error_and_the_first_instance_keeps_serving(workdir):
    with running_driver("--role", "node", workdir=workdir) as first:
        result = run_cli(
            "serve", "--role", "node", "--endpoint", f"unix://{first.socket}", "--state-dir", str(workdir / "state2")
        )
        assert result.returncode == 1
        assert f"another process is already serving on {first.socket}" in result.stderr
        first.wait_ready()


def test_a_file_in_the_way_is_not_replaced(workdir):
    (workdir / "csi.sock").write_text("precious")
    result = run_cli("serve", "--role", "node", "--endpoint", f"unix://{workdir}/csi.sock")
    assert result.returncode == 1
    assert "exists and is not a socket" in result.stderr
    assert (workdir / "csi.sock").read_text() == "precious"


def test_tcp_endpoint(workdir):
    driver = Driver(["--role", "node"], workdir, target=f"tcp://127.0.0.1:{free_port()}")
    try:
        driver.wait_serving().wait_ready()
        assert not driver.socket.exists()
    finally:
        driver.close()


class StallingServer:
    """Accepts TCP connections and never answers: a database that hangs, to make a call slow for real."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            conn.close()


@pytest.fixture
def stalling_db():
    server = StallingServer()
    yield server
    server.close()


def slow_probe_driver(workdir, stalling_db, *extra: str) -> Driver:
    url = f"postgresql://mbs@127.0.0.1:{stalling_db.port}/mbs"
    return Driver(["--role", "controller", "--database", url, *extra], workdir)


@pytest.mark.slow
def test_sigterm_drains_an_in_flight_call_then_exits_0(workdir, stalling_db):
    driver = slow_probe_driver(workdir, stalling_db)
    try:
        driver.wait_serving()
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            in_flight = pool.submit(driver.probe)  # blocks ~5 s on the stalling database
            driver.wait_logged("Probe called")  # the call is in the server, blocked on the database
            driver.proc.send_signal(signal.SIGTERM)
            driver.wait_logged("received SIGTERM: draining")
            assert driver.proc.poll() is None, "exited with a call still in flight"
            with pytest.raises(grpc.RpcError) as refused:  # new calls are turned away while draining
                csi_pb2_grpc.IdentityStub(grpc.insecure_channel(f"unix://{driver.socket}")).GetPluginInfo(
                    csi_pb2.GetPluginInfoRequest(), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert in_flight.result(timeout=30) is False  # completed, with the answer for a dead database
            assert time.monotonic() - started >= 4
        assert driver.proc.wait(30) == 0
        assert "received SIGTERM: draining" in driver.log()
    finally:
        driver.close()


@pytest.mark.slow
def test_grace_period_bounds_the_drain(workdir, stalling_db):
    driver = slow_probe_driver(workdir, stalling_db, "--grace-period", "1")
    try:
        driver.wait_serving()
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(driver.probe)
            driver.wait_logged("Probe called")
            driver.proc.send_signal(signal.SIGINT)
            assert driver.proc.wait(30) == 0
            # Cut, not answered: the drain did not wait for the 5 s call (a duration would flake under load).
            with pytest.raises(grpc.RpcError) as cut:
                in_flight.result(timeout=30)
            assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        driver.close()
