"""The Kubernetes connector store: a node publishes its connector properties on its Node object and the
controller finds them there for ControllerPublishVolume. The API server is a stand-in (see
tests/kube_standin.py); the kubernetes client, the driver processes and the loopback volumes are real."""

from __future__ import annotations

import json
import sys
import time

import grpc
import pytest

from csi import csi_pb2 as pb
from mbs_csi import errors
from mbs_csi.node.connector_publisher import publish_in_child
from mbs_csi.node_annotations import NodeAnnotations
from testkit.controller import ControllerUnderTest
from testkit.csi_requests import create_request, mount_cap
from testkit.host import REPO
from testkit.processes import run_tree
from testkit.rpc import rpc_error
from testkit.wait import wait_until
from tests.kube_standin import KubeApiStandIn

KEY = "mbs.csi.io/connector"
PROPERTIES = {"host": "worker-1", "initiator": "iqn.1994-05.com.redhat:worker-1", "multipath": False}


@pytest.fixture
def api():
    standin = KubeApiStandIn()
    yield standin
    standin.close()


def test_publish_then_lookup_through_the_node_object(api, tmp_path):
    api.add_node("worker-1", {"other/annotation": "kept"})
    store = NodeAnnotations(KEY, api.kubeconfig(tmp_path / "kubeconfig"))
    assert store.lookup("worker-1") is None  # nothing published yet
    store.publish("worker-1", PROPERTIES)
    assert json.loads(api.annotations("worker-1")[KEY]) == PROPERTIES
    assert api.annotations("worker-1")["other/annotation"] == "kept"
    assert store.lookup("worker-1") == PROPERTIES
    assert ("PATCH", "/api/v1/nodes/worker-1", "application/strategic-merge-patch+json") in api.requests
    assert store.lookup("no-such-node") is None
    with pytest.raises(errors.NotFound, match="there is no Node no-such-node"):
        store.publish("no-such-node", PROPERTIES)


def test_a_node_publishes_from_a_child_process(api, tmp_path):
    api.add_node("worker-2")
    store = NodeAnnotations(KEY, api.kubeconfig(tmp_path / "kubeconfig"))
    publish_in_child(store, "worker-2", PROPERTIES)
    assert json.loads(api.annotations("worker-2")[KEY]) == PROPERTIES
    with pytest.raises(errors.Unavailable, match="there is no Node worker-3"):
        publish_in_child(store, "worker-3", PROPERTIES)


def test_api_errors_are_clear_and_prompt(api, tmp_path):
    api.add_node("worker-1", {KEY: "not json"})
    store = NodeAnnotations(KEY, api.kubeconfig(tmp_path / "kubeconfig"))
    with pytest.raises(errors.FailedPrecondition, match=r"annotation mbs\.csi\.io/connector of Node worker-1 is not"):
        store.lookup("worker-1")

    refused = NodeAnnotations(KEY, api.kubeconfig(tmp_path / "wrong-token", token="wrong"))
    with pytest.raises(errors.Unavailable, match="the Kubernetes API refused to read Node worker-1: 401"):
        refused.lookup("worker-1")

    with pytest.raises(errors.Unavailable, match="cannot load the Kubernetes API configuration from kubeconfig"):
        NodeAnnotations(KEY, tmp_path / "absent").lookup("worker-1")

    api.close()
    started = time.monotonic()
    with pytest.raises(errors.Unavailable, match="cannot reach the Kubernetes API to read Node worker-1"):
        store.lookup("worker-1")
    assert time.monotonic() - started < 10


def test_controller_publishes_to_a_node_found_through_the_kubernetes_store(api, tmp_path):
    """Role all with connector_store kubernetes: the node half publishes on its Node object, the
    controller half reads it there, and an unknown node is NOT_FOUND."""
    api.add_node("k8s-node")
    api.add_node("silent-node")
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    ctl = ControllerUnderTest(
        None,
        extra={"role": "all", "node_id": "k8s-node", "connector_store": "kubernetes", "kubeconfig": str(kubeconfig)},
    )
    try:
        wait_until(lambda: KEY in api.annotations("k8s-node"), 60, lambda: f"the annotation; {ctl.driver.log()}")
        assert json.loads(api.annotations("k8s-node")[KEY])["host"] == "k8s-node"

        cap = mount_cap("ext4")
        volume = ctl.stub.CreateVolume(create_request("pvc-k8s-store", caps=[cap])).volume
        publish = pb.ControllerPublishVolumeRequest(
            volume_id=volume.volume_id, node_id="k8s-node", volume_capability=cap
        )
        for node in ("silent-node", "no-such-node"):
            publish.node_id = node
            error = rpc_error(ctl.stub.ControllerPublishVolume, publish)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert f"node {node} has not published its connector properties (kubernetes store)" in error.details()
        publish.node_id = "k8s-node"
        context = ctl.stub.ControllerPublishVolume(publish).publish_context
        assert context["driver_volume_type"] == "local" and context["device_path"].startswith("/dev/loop")

        ctl.stub.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id="k8s-node")
        )
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    finally:
        ctl.close()


def test_the_node_role_publishes_without_importing_the_kubernetes_client(api, tmp_path):
    api.add_node("lean-node")
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    script = (
        "import sys, threading, time\n"
        "from mbs_csi import config\n"
        "from mbs_csi.server import Server\n"
        f"settings = config.load_settings(env={{}}, flags={{'role': 'node', 'node_id': 'lean-node', "
        f"'state_dir': '{tmp_path}/state', 'endpoint': 'unix://{tmp_path}/csi.sock', "
        f"'connector_store': 'kubernetes', 'kubeconfig': '{kubeconfig}'}})\n"
        "server = Server(settings)\n"
        "server.start()\n"
        "deadline = time.monotonic() + 60\n"
        "while any(t.name == 'connector' for t in threading.enumerate()) and time.monotonic() < deadline:\n"
        "    time.sleep(0.1)\n"
        "server.stop(0)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'cinder', 'cinderlib')))\n"
    )
    out = run_tree([sys.executable, "-c", script], 120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads(api.annotations("lean-node")[KEY])["host"] == "lean-node"
