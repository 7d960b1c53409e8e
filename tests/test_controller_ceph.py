"""The controller against a real Ceph cluster through Cinder's stock RBD driver: the RPCs a PVC's life
uses, the connection info of type rbd with its keyring kept out of publish_context, and no image left."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from csi import csi_pb2 as pb
from mbs_csi import mutable_parameters
from testkit.controller import ControllerUnderTest
from testkit.csi_requests import GIB, create_request, mount_cap
from testkit.rpc import rpc_error
from testkit.wait import wait_until


def rbd_backend(ceph) -> dict:
    return {
        "name": "ceph",
        "volume_driver": "cinder.volume.drivers.rbd.RBDDriver",
        "driver_options": {
            "rbd_pool": ceph.pool,
            "rbd_ceph_conf": str(ceph.conf_path),
            "rbd_user": ceph.user,
            "rbd_keyring_conf": str(ceph.keyring_path),
            # Without this, a clone from a volume leaves a volume-<id>.deleted image behind.
            "rbd_max_clone_depth": 0,
            # One attempt at each rados call: a busy image fails at once instead of after ~15 s of retries.
            "rados_connection_retries": 1,
        },
        # The driver's QoS limits, and two extra specs it cannot take together (a refused retype).
        "mutable_parameters": [*mutable_parameters.QOS_LIMITS, "replication_enabled", "multiattach"],
    }


@pytest.fixture(scope="module")
def ceph_ctl(ceph):
    ctl = ControllerUnderTest(None, backends=[rbd_backend(ceph)])
    ctl.register_nodes("node-a")
    yield ctl
    ctl.close()


def rbd_size(ceph, image: str) -> int:
    return json.loads(ceph.rbd("info", "--format", "json", f"{ceph.pool}/{image}"))["size"]


def test_a_volume_life_on_ceph_leaves_no_image_behind(ceph, ceph_ctl):
    stub = ceph_ctl.stub
    source = stub.CreateVolume(create_request("pvc-ceph-source", required=GIB)).volume
    image = f"volume-{source.volume_id}"
    assert image in ceph.images() and rbd_size(ceph, image) == GIB

    clone = stub.CreateVolume(create_request("pvc-ceph-clone", required=2 * GIB, volume=source.volume_id)).volume
    assert clone.capacity_bytes == 2 * GIB and rbd_size(ceph, f"volume-{clone.volume_id}") == 2 * GIB

    snap = stub.CreateSnapshot(pb.CreateSnapshotRequest(name="snap-ceph", source_volume_id=source.volume_id)).snapshot
    assert snap.ready_to_use and snap.size_bytes == GIB
    restored = stub.CreateVolume(
        create_request("pvc-ceph-restored", required=3 * GIB, snapshot=snap.snapshot_id)
    ).volume
    assert restored.capacity_bytes == 3 * GIB and rbd_size(ceph, f"volume-{restored.volume_id}") == 3 * GIB

    grown = stub.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=source.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * GIB)
        )
    )
    assert grown.capacity_bytes == 2 * GIB and rbd_size(ceph, image) == 2 * GIB

    published = stub.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(volume_id=source.volume_id, node_id="node-a", volume_capability=mount_cap())
    )
    context = dict(published.publish_context)
    assert context["driver_volume_type"] == "rbd"
    assert context["name"] == f"{ceph.pool}/{image}"
    assert context["auth_username"] == ceph.user
    assert json.loads(context["hosts"]) == ["127.0.0.1"]
    # The RBD driver puts the whole keyring in its connection info: it must not reach publish_context.
    assert context["mbs.secret_keys"] == "keyring" and "keyring" not in context
    assert not any(ceph.key in value for value in context.values())
    status = stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=source.volume_id)).status
    assert list(status.published_node_ids) == ["node-a"] and not status.volume_condition.abnormal

    assert stub.GetCapacity(pb.GetCapacityRequest()).available_capacity > 0

    stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=source.volume_id, node_id="node-a"))
    for volume in (restored, clone):
        stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=source.volume_id))
    assert ceph.images() == []


def test_an_image_removed_behind_the_drivers_back_makes_the_condition_abnormal(ceph, ceph_ctl):
    volume = ceph_ctl.stub.CreateVolume(create_request("pvc-ceph-vanishing")).volume
    ceph.rbd("rm", f"{ceph.pool}/volume-{volume.volume_id}")
    status = ceph_ctl.stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume.volume_id)).status
    assert status.volume_condition.abnormal
    assert "missing on backend ceph" in status.volume_condition.message
    ceph_ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))  # gone already: still OK
    assert (
        rpc_error(ceph_ctl.stub.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=volume.volume_id)).code()
        == grpc.StatusCode.NOT_FOUND
    )
    assert ceph.images() == []


def test_a_volume_held_open_by_another_client_answers_aborted_and_is_kept(ceph, ceph_ctl):
    import rados
    import rbd

    volume = ceph_ctl.stub.CreateVolume(create_request("pvc-ceph-busy")).volume
    image = f"volume-{volume.volume_id}"
    request = pb.DeleteVolumeRequest(volume_id=volume.volume_id)
    with (
        rados.Rados(conffile=str(ceph.conf_path), rados_id="admin") as cluster,
        cluster.open_ioctx(ceph.pool) as ioctx,
        rbd.Image(ioctx, image),  # a watcher: the image cannot be removed while it is open
    ):
        error = rpc_error(ceph_ctl.stub.DeleteVolume, request)
        assert error.code() == grpc.StatusCode.ABORTED
        assert "busy" in error.details() and "try again" in error.details()
        assert image in ceph.images()
        ceph_ctl.stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    ceph_ctl.stub.DeleteVolume(request)  # the CO's retry, once the other client let go
    assert image not in ceph.images()


def admin_socket(ceph, daemon: str, *command: str):
    """A command on a daemon's admin socket: it opens no client session of its own."""
    out = subprocess.run(
        ["ceph", "--conf", str(ceph.conf_path), "daemon", daemon, *command],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def cinder_client_addresses(ceph) -> list[str]:
    """The addresses (``ip:port/nonce``) of the driver's open connections, as the monitor sees them."""
    found = []
    for session in admin_socket(ceph, "mon.a", "sessions"):
        if session.get("entity_name") == f"client.{ceph.user}":
            for addr in session["addrs"]["addrvec"]:
                found.append(f"{addr['addr']}/{addr['nonce']}")
    return found


def test_workers_keep_their_ceph_connections_between_calls(ceph, ceph_ctl):
    """Cinder's RBD driver connects for every operation; the workers hand a released connection to the
    next one. The monitor counts every session that closes: a dozen calls close next to none."""
    stub = ceph_ctl.stub
    stub.DeleteVolume(
        pb.DeleteVolumeRequest(volume_id=stub.CreateVolume(create_request("pvc-ceph-warm")).volume.volume_id)
    )
    closed_before = admin_socket(ceph, "mon.a", "perf", "dump")["mon"]["session_rm"]
    for i in range(6):
        volume = stub.CreateVolume(create_request(f"pvc-ceph-reuse-{i}")).volume
        stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    closed = admin_socket(ceph, "mon.a", "perf", "dump")["mon"]["session_rm"] - closed_before
    # Without reuse each create and each delete opens and closes at least one: 12 or more.
    assert closed < 6, f"{closed} monitor sessions closed during 6 create/delete cycles"
    assert cinder_client_addresses(ceph), "no connection kept open"
    assert ceph.images() == []


def test_a_blocklisted_connection_is_replaced_without_failing_a_call(ceph, ceph_ctl):
    """A kept connection can be blocklisted (``ceph osd blocklist``): its next call fails at once with
    ESHUTDOWN. The call runs again on a new connection, so every request still succeeds."""
    stub = ceph_ctl.stub
    warm = [stub.CreateVolume(create_request(f"pvc-ceph-bl-warm-{i}")).volume for i in range(4)]
    addresses = cinder_client_addresses(ceph)
    assert addresses
    for address in addresses:
        ceph.ceph("osd", "blocklist", "add", address)
    epoch = ceph.ceph_json("osd", "dump")["epoch"]
    # The OSD enforces what its map says.
    wait_until(lambda: admin_socket(ceph, "osd.0", "status")["newest_map"] >= epoch, 60, "the OSD to see the blocklist")
    try:
        # As many calls at once as there are workers, so that every worker serves calls on its blocklisted
        # connection (one after the other, the same idle worker could take them all and another keep its
        # connection open, untouched).
        with ThreadPoolExecutor(ceph_ctl.settings.backend_workers) as calls:
            made = list(calls.map(lambda i: stub.CreateVolume(create_request(f"pvc-ceph-bl-{i}")).volume, range(8)))
            delete = pb.DeleteVolumeRequest
            list(calls.map(lambda volume: stub.DeleteVolume(delete(volume_id=volume.volume_id)), [*made, *warm]))
        assert not set(addresses) & set(cinder_client_addresses(ceph)), "a blocklisted connection is still open"
    finally:
        ceph.ceph("osd", "blocklist", "clear")
    assert ceph.images() == []
    assert "trying again on a new one" in ceph_ctl.driver.log()


def test_the_keyring_reaches_neither_the_database_nor_the_log(ceph):
    """Cinder's RBD driver returns the keyring file's content in its connection info, which cinderlib
    stores with the connection, and logs it at DEBUG."""
    ctl = ControllerUnderTest(None, extra={"log_level": "DEBUG"}, backends=[rbd_backend(ceph)])
    try:
        ctl.register_nodes("node-a")
        volume = ctl.stub.CreateVolume(create_request("pvc-ceph-keyring")).volume
        request = pb.ControllerPublishVolumeRequest(
            volume_id=volume.volume_id, node_id="node-a", volume_capability=mount_cap()
        )
        first = dict(ctl.stub.ControllerPublishVolume(request).publish_context)
        log = ctl.driver.log()
        assert "connection data" in log  # the driver's DEBUG line, with the keyring masked
        assert ceph.key not in log

        ctl.restart()  # the repeat is answered from what the database kept
        again = dict(ctl.stub.ControllerPublishVolume(request).publish_context)
        assert again == first and first["mbs.secret_keys"] == "keyring"
        stored = b"".join(path.read_bytes() for path in ctl.state.glob("mbs-csi.sqlite*"))
        assert ctl.settings.database.endswith("mbs-csi.sqlite") and b"volume_attachment" in stored
        assert f"{ceph.pool}/volume-{volume.volume_id}".encode() in stored  # the connection info is kept...
        assert ceph.key.encode() not in stored  # ...without the keyring

        ctl.stub.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id="node-a")
        )
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    finally:
        ctl.close()
    assert ceph.images() == []


# --- mutable parameters: librbd's per-image QoS limits -------------------------------------------------

# What Cinder's RBD driver sets for each QoS spec (its QOS_KEY_MAP), read back from the image.
RBD_QOS = {"total_iops_sec": "rbd_qos_iops_limit", "read_bytes_sec": "rbd_qos_read_bps_limit"}


def image_qos(ceph, volume_id: str) -> dict[str, str]:
    """The image's own QoS settings (source "image"): what the driver set on it, nothing inherited."""
    listed = json.loads(ceph.rbd("config", "image", "list", f"{ceph.pool}/volume-{volume_id}", "--format", "json"))
    return {c["name"]: c["value"] for c in listed if c["name"].startswith("rbd_qos_") and c["source"] == "image"}


def modify(ctl, volume_id: str, **parameters: str) -> None:
    ctl.stub.ControllerModifyVolume(
        pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=parameters)
    )


def test_mutable_parameters_set_the_images_qos_limits_on_create_and_modify(ceph, ceph_ctl):
    stub = ceph_ctl.stub
    volume = stub.CreateVolume(create_request("pvc-ceph-qos", mutable_parameters={"total_iops_sec": "300"})).volume
    assert image_qos(ceph, volume.volume_id) == {"rbd_qos_iops_limit": "300"}
    assert stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume.volume_id)).volume == volume

    modify(ceph_ctl, volume.volume_id, total_iops_sec="500", read_bytes_sec="1048576")
    assert image_qos(ceph, volume.volume_id) == {"rbd_qos_iops_limit": "500", "rbd_qos_read_bps_limit": "1048576"}
    type_before = ceph_ctl.volume_type(volume.volume_id)
    modify(ceph_ctl, volume.volume_id, total_iops_sec="500")  # again: nothing to do
    assert ceph_ctl.volume_type(volume.volume_id) == type_before
    modify(ceph_ctl, volume.volume_id, read_bytes_sec="2097152")  # total_iops_sec not named: it stays
    assert image_qos(ceph, volume.volume_id) == {"rbd_qos_iops_limit": "500", "rbd_qos_read_bps_limit": "2097152"}

    error = rpc_error(
        stub.ControllerModifyVolume,
        pb.ControllerModifyVolumeRequest(volume_id=volume.volume_id, mutable_parameters={"XXX_FakeKey": "1"}),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "XXX_FakeKey" in error.details()
    error = rpc_error(
        stub.ControllerModifyVolume,
        pb.ControllerModifyVolumeRequest(volume_id="no-such-volume", mutable_parameters={"total_iops_sec": "1"}),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    for request in (
        pb.ControllerModifyVolumeRequest(mutable_parameters={"total_iops_sec": "1"}),
        pb.ControllerModifyVolumeRequest(volume_id=volume.volume_id),
    ):
        assert rpc_error(stub.ControllerModifyVolume, request).code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert ceph.images() == []
    assert not [name for name in ceph_ctl.volume_type_names() if volume.volume_id in name]


def test_a_retype_the_rbd_driver_refuses_leaves_the_image_unchanged(ceph, ceph_ctl):
    """Cinder's RBD driver sets the new QoS limits, then refuses a type that asks for replication and
    multiattach together: the limits it already set are put back."""
    volume = ceph_ctl.stub.CreateVolume(
        create_request("pvc-ceph-refused", mutable_parameters={"total_iops_sec": "300"})
    ).volume
    type_before = ceph_ctl.volume_type(volume.volume_id)
    request = pb.ControllerModifyVolumeRequest(
        volume_id=volume.volume_id,
        mutable_parameters={
            "total_iops_sec": "900",
            "read_bytes_sec": "4096",
            "replication_enabled": "<is> True",
            "multiattach": "<is> True",
        },
    )
    error = rpc_error(ceph_ctl.stub.ControllerModifyVolume, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mutually exclusive" in error.details() and "the volume is unchanged" in error.details()
    assert image_qos(ceph, volume.volume_id) == {"rbd_qos_iops_limit": "300"}
    assert ceph_ctl.volume_type(volume.volume_id) == type_before
    ceph_ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert ceph.images() == []
