"""The socket answers from the moment it exists (issue 12, defect 3).

The kubernetes-csi sidecars give a new connection 1 s and exit when it does not answer. Here the node's
os-brick set-up is held by a stand-in (the real set-up, called once the test releases it), so the
window between "socket exists" and "role set up" is as long as the test needs instead of the 0.5-2.5 s
it takes on a real node.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc
from testkit.driver import driver_env
from testkit.host import REPO, short_tmpdir
from testkit.processes import ProcessTree
from testkit.rpc import rpc_error
from testkit.wait import wait_until

HELD_START = textwrap.dedent(
    """
    import os, sys, time
    from mbs_csi.node import brick

    real_setup = brick.setup_privileges

    def held_setup(*args, **kwargs):
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.05)
        return real_setup(*args, **kwargs)

    brick.setup_privileges = held_setup
    from mbs_csi.cli import main

    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_identity_answers_while_the_role_sets_up_and_other_calls_wait(workdir: Path) -> None:
    socket, release = workdir / "csi.sock", workdir / "release"
    log = (workdir / "driver.log").open("w")
    argv = [sys.executable, "-c", HELD_START, str(release), "serve", "--role", "node"]
    argv += ["--endpoint", f"unix://{socket}", "--state-dir", str(workdir / "state"), "--node-id", "n1"]
    tree = ProcessTree(argv, driver_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until(socket.exists, 60, "the driver's socket")
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            identity, node = csi_pb2_grpc.IdentityStub(channel), csi_pb2_grpc.NodeStub(channel)
            # While the set-up is held: Identity answers at once (the sidecars' budget is 1 s; 5 s here
            # leaves room for a loaded machine, and without the fix no answer comes at all).
            assert identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=5).name == "mbs.csi.io"
            assert identity.Probe(pb.ProbeRequest(), timeout=5).ready.value is False
            error = rpc_error(lambda: node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "starting" in (error.details() or "")

            release.touch()
            wait_until(lambda: identity.Probe(pb.ProbeRequest(), timeout=5).ready.value, 60, "Probe ready")
            assert node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=5).node_id == "n1"
    finally:
        tree.kill()
        log.close()
