"""Node loss: ControllerUnpublishVolume for a node that is gone (its connector properties no longer in the
connector store) succeeds and terminates the connection on the storage by force; the Kubernetes
non-graceful shutdown flow (out-of-service taint, then a force detach while the node never unstaged), at
the CSI level. Real ``mbs-csi`` processes over gRPC, the loopback backend (real loop devices, mkfs and
mounts), SQLite and a real PostgreSQL; the Kubernetes API is the stand-in of tests/kube_standin.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc
from testkit.controller import ControllerUnderTest, controller_on, unique
from testkit.csi_requests import create_request, mount_cap
from testkit.driver import run_cli
from testkit.wait import wait_until
from tests.kube_standin import KubeApiStandIn


def audit(ctl: ControllerUnderTest, *flags: str) -> tuple[int, dict]:
    """``mbs-csi controller audit --json`` on the controller's configuration: (exit code, report)."""
    done = run_cli("controller", "audit", "--config", str(ctl.config_path), "--json", *flags, timeout=180)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def by_kind(report: dict) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for finding in report["findings"]:
        found.setdefault(finding["kind"], set()).add(finding["name"])
    return found


def forced(store: str, volume_id: str) -> str:
    """The controller's log line for a connection terminated by force."""
    return (
        f"is gone (its connector properties are no longer in the {store} store): terminating the connection of "
        f"volume {volume_id} by force"
    )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ctl(request):
    with controller_on(request, ("alive-node",)) as controller:
        yield controller


def forget_connector(database: str, node_id: str) -> None:
    """The node's row in the database connector store is gone, as when a node is removed for good."""
    engine = sqlalchemy.create_engine(database)
    try:
        with engine.begin() as connection:
            deleted = connection.execute(
                sqlalchemy.text("DELETE FROM cinderlib_persistence_key_value WHERE key = :key"),
                {"key": f"connector:{node_id}"},
            ).rowcount
        assert deleted == 1
    finally:
        engine.dispose()


def publish(ctl: ControllerUnderTest, volume_id: str, node_id: str) -> dict[str, str]:
    request = pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id, volume_capability=mount_cap())
    return dict(ctl.stub.ControllerPublishVolume(request).publish_context)


def unpublish(ctl: ControllerUnderTest, volume_id: str, node_id: str) -> None:
    ctl.stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id))


def published_nodes(ctl: ControllerUnderTest, volume_id: str) -> list[str]:
    request = pb.ControllerGetVolumeRequest(volume_id=volume_id)
    return list(ctl.stub.ControllerGetVolume(request).status.published_node_ids)


def test_unpublish_from_a_node_that_is_gone_forces_and_forgets(ctl):
    doomed = unique("node")
    ctl.register_nodes(doomed)
    lost, kept = (ctl.stub.CreateVolume(create_request(unique())).volume.volume_id for _ in range(2))
    device = publish(ctl, lost, doomed)["device_path"]
    publish(ctl, kept, "alive-node")
    forget_connector(ctl.settings.database, doomed)

    unpublish(ctl, lost, doomed)
    assert published_nodes(ctl, lost) == []
    assert device not in ctl.loop_devices()  # the storage no longer serves it
    assert forced("database", lost) in ctl.driver.log()
    unpublish(ctl, lost, doomed)  # idempotent

    unpublish(ctl, kept, "alive-node")  # a node that is still there: a plain terminate
    assert published_nodes(ctl, kept) == []
    assert forced("database", kept) not in ctl.driver.log()
    for volume_id in (lost, kept):
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


def mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_non_graceful_node_shutdown_force_detaches_a_volume_the_node_never_unstaged(tmp_path):
    """Role all with the kubernetes connector store: a volume is staged and mounted (real mkfs and mount),
    the node dies and its Node object is deleted (or tainted out-of-service and then removed); the
    attach-detach controller's force detach is a ControllerUnpublishVolume while the node never unstaged.
    It succeeds, by force; the volume can then be published elsewhere and deleted once the node's mounts
    are gone (here: the same host cleans up, as a rebooted node's plugin would)."""
    api = KubeApiStandIn()
    node = "doomed-node"
    api.add_node(node)
    api.add_node("new-node", {"mbs.csi.io/connector": '{"host": "new-node", "multipath": false}'})
    ctl = ControllerUnderTest(
        None,
        extra={
            "role": "all",
            "node_id": node,
            "connector_store": "kubernetes",
            "kubeconfig": str(api.kubeconfig(tmp_path / "kubeconfig")),
        },
    )
    try:
        wait_until(lambda: "mbs.csi.io/connector" in api.annotations(node), 60, ctl.driver.log)
        nodes = csi_pb2_grpc.NodeStub(ctl.driver.channel)
        cap = mount_cap("ext4")
        volume_id = ctl.stub.CreateVolume(create_request(unique(), caps=[cap])).volume.volume_id
        context = publish(ctl, volume_id, node)
        staging = ctl.workdir / "staging"
        stage = pb.NodeStageVolumeRequest(
            volume_id=volume_id, publish_context=context, staging_target_path=str(staging), volume_capability=cap
        )
        nodes.NodeStageVolume(stage)
        assert mounted(staging)

        api.remove_node(node)  # the node is gone; its plugin never unstages
        code, report = audit(ctl)  # the audit sees it through the Kubernetes API
        assert code == 1 and by_kind(report) == {"connection_to_missing_node": {f"{volume_id}@{node}"}}
        unpublish(ctl, volume_id, node)
        assert published_nodes(ctl, volume_id) == []
        assert forced("kubernetes", volume_id) in ctl.driver.log()
        # The CO may attach the volume to another node now (loopback: the same host, a new loop device).
        assert publish(ctl, volume_id, "new-node")["device_path"] != context["device_path"]
        unpublish(ctl, volume_id, "new-node")
        assert audit(ctl)[0] == 0
        assert forced("kubernetes", volume_id) not in ctl.driver.log().split("new-node")[-1]

        nodes.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging)))
        assert not mounted(staging)
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
        wait_until(lambda: ctl.loop_devices() == [], 30, lambda: str(ctl.loop_devices()))
    finally:
        ctl.close()
        api.close()
