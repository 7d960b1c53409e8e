"""Attach limits, node loss and the audit on a real Ceph cluster through Cinder's stock RBD driver: a
backend's ``max_volumes_per_node``, an unpublish for a node that is gone, and ``mbs-csi controller audit``
with orphans planted with ``rbd`` by hand."""

from __future__ import annotations

import uuid

import grpc
import pytest

from csi import csi_pb2 as pb
from testkit.controller import ControllerUnderTest, unique
from testkit.csi_requests import create_request
from testkit.rpc import rpc_error
from tests.test_attach_limits import publish_request
from tests.test_controller_ceph import rbd_backend
from tests.test_node_loss import audit, by_kind, forced, forget_connector, published_nodes, unpublish

LIMIT = 2


@pytest.fixture(scope="module")
def ctl(ceph):
    controller = ControllerUnderTest(None, backends=[{**rbd_backend(ceph), "max_volumes_per_node": LIMIT}])
    controller.register_nodes("live-node")
    yield controller
    controller.close()


def publish(ctl: ControllerUnderTest, volume_id: str, node_id: str) -> dict[str, str]:
    return dict(ctl.stub.ControllerPublishVolume(publish_request(volume_id, node_id)).publish_context)


def test_the_backends_attach_limit_on_ceph(ceph, ctl):
    ids = [ctl.stub.CreateVolume(create_request(unique())).volume.volume_id for _ in range(LIMIT + 1)]
    try:
        for volume_id in ids[:LIMIT]:
            publish(ctl, volume_id, "live-node")
        publish(ctl, ids[0], "live-node")  # again: idempotent, not one more
        error = rpc_error(ctl.stub.ControllerPublishVolume, publish_request(ids[LIMIT], "live-node"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"already has {LIMIT} volume(s) of backend ceph published" in error.details()
        assert published_nodes(ctl, ids[LIMIT]) == []
    finally:
        for volume_id in ids:
            unpublish(ctl, volume_id, "live-node")
            ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


def test_unpublish_from_a_node_that_is_gone_on_ceph(ceph, ctl):
    """The RBD driver's terminate_connection is called with force=True (it has nothing to revoke: Ceph
    grants access by key, not by host; fencing a dead client is Ceph's blocklist, see the README)."""
    doomed = unique("node")
    ctl.register_nodes(doomed)
    volume_id = ctl.stub.CreateVolume(create_request(unique())).volume.volume_id
    assert publish(ctl, volume_id, doomed)["driver_volume_type"] == "rbd"
    forget_connector(ctl.settings.database, doomed)
    unpublish(ctl, volume_id, doomed)
    assert published_nodes(ctl, volume_id) == []
    assert forced("database", volume_id) in ctl.driver.log()
    ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    assert f"volume-{volume_id}" not in ceph.images()


def test_audit_on_ceph_reports_planted_orphans_and_never_removes_an_image(ceph, ctl):
    # Ours: a volume published to a node that will be gone, one whose image is removed behind the driver's
    # back, and a snapshot likewise.
    gone_node = unique("node")
    ctl.register_nodes(gone_node)
    published, vanished, kept = (ctl.stub.CreateVolume(create_request(unique())).volume.volume_id for _ in range(3))
    publish(ctl, published, gone_node)
    forget_connector(ctl.settings.database, gone_node)
    ceph.rbd("rm", f"{ceph.pool}/volume-{vanished}")
    snapshot_id = ctl.stub.CreateSnapshot(
        pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=kept)
    ).snapshot.snapshot_id
    ceph.rbd("snap", "unprotect", f"{ceph.pool}/volume-{kept}@snapshot-{snapshot_id}")  # cinder protects them
    ceph.rbd("snap", "rm", f"{ceph.pool}/volume-{kept}@snapshot-{snapshot_id}")
    # Not ours, or not recorded: an image and a snapshot named like ours, and an image named otherwise.
    stray_image = f"volume-{uuid.uuid4()}"
    stray_snapshot = f"snapshot-{uuid.uuid4()}"
    ceph.rbd("create", "--size", "1M", f"{ceph.pool}/{stray_image}")
    ceph.rbd("snap", "create", f"{ceph.pool}/volume-{kept}@{stray_snapshot}")
    ceph.rbd("create", "--size", "1M", f"{ceph.pool}/someone-elses-image")
    try:
        code, report = audit(ctl)
        assert code == 1
        found = by_kind(report)
        assert found["volume_without_record"] >= {stray_image}  # the pool may hold other tests' images
        assert "someone-elses-image" not in str(report)
        assert found["snapshot_without_record"] >= {stray_snapshot}
        assert found["record_without_volume"] == {vanished}
        assert found["record_without_snapshot"] == {snapshot_id}
        assert found["connection_to_missing_node"] == {f"{published}@{gone_node}"}
        assert "temporary_leftover" not in found and report["skipped"] == []

        code, report = audit(ctl, "--fix")
        assert code == 1
        assert report["fixed"] == [f"terminated the connection of volume {published} to node {gone_node}"]
        assert "connection_to_missing_node" not in by_kind(report)
        assert published_nodes(ctl, published) == []
        assert stray_image in ceph.images() and f"volume-{kept}" in ceph.images()  # nothing on the storage removed
        assert stray_snapshot in ceph.rbd("snap", "ls", f"{ceph.pool}/volume-{kept}")
    finally:
        ceph.rbd("snap", "rm", f"{ceph.pool}/volume-{kept}@{stray_snapshot}")
        ceph.rbd("rm", f"{ceph.pool}/{stray_image}")
        ceph.rbd("rm", f"{ceph.pool}/someone-elses-image")
        ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))
        for volume_id in (published, vanished, kept):
            ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    assert not [i for i in ceph.images() if any(v in i for v in (published, vanished, kept))]
