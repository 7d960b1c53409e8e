"""Prometheus metrics: every CSI call is counted by method and status code, and readiness is a gauge;
nothing is served unless metrics_endpoint is set."""

from __future__ import annotations

import shutil
import socket
import urllib.error
import urllib.request

import grpc
import pytest

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc
from testkit.driver import run_cli, running_driver
from testkit.host import free_port, short_tmpdir
from testkit.http import scrape


def test_calls_are_counted_by_method_and_status_and_readiness_is_exposed():
    workdir = short_tmpdir()
    state = workdir / "state"
    port = free_port()
    args = ["--role", "node", "--state-dir", str(state), "--metrics-endpoint", f"127.0.0.1:{port}"]
    try:
        with running_driver(*args, workdir=workdir) as driver:
            driver.wait_ready()
            node = csi_pb2_grpc.NodeStub(driver.channel)
            with pytest.raises(grpc.RpcError):
                node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v"))  # no target_path
            samples = scrape(port)
            assert samples['mbs_csi_rpc_duration_seconds_count{code="OK",method="Probe"}'] >= 1
            assert (
                samples['mbs_csi_rpc_duration_seconds_count{code="INVALID_ARGUMENT",method="NodeUnpublishVolume"}'] == 1
            )
            assert samples["mbs_csi_ready"] == 1.0
            shutil.rmtree(state)
            state.write_text("a file where the state dir should be")
            assert scrape(port)["mbs_csi_ready"] == 0.0
            state.unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_no_metrics_unless_asked_and_a_taken_port_is_an_error():
    workdir = short_tmpdir()
    port = free_port()
    try:
        with running_driver("--role", "node", "--state-dir", str(workdir / "state"), workdir=workdir) as driver:
            driver.wait_ready()
            assert "metrics" not in driver.log()
            with pytest.raises(urllib.error.URLError):
                scrape(port)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            result = run_cli(
                "serve",
                "--role",
                "node",
                "--state-dir",
                str(workdir / "state"),
                "--endpoint",
                f"unix://{workdir}/other.sock",
                "--metrics-endpoint",
                f"127.0.0.1:{port}",
            )
        assert result.returncode == 1
        assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in result.stderr
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
