"""Attach limits (``max_volumes_per_node``, global and per backend) and the switch for alpha capabilities,
through the real ``mbs-csi`` process over gRPC, on the loopback backend (real files and loop devices) with
SQLite and a real PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc
from mbs_csi import alpha, config, errors
from testkit.controller import ControllerUnderTest, controller_on, unique
from testkit.csi_requests import create_request, mount_cap
from testkit.rpc import rpc_error

Code = grpc.StatusCode
RPC = pb.ControllerServiceCapability.RPC
NODE_RPC = pb.NodeServiceCapability.RPC
LIMIT = 2


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ctl(request):
    with controller_on(request, ("full-node", "race-node", "other-node"), {"max_volumes_per_node": LIMIT}) as c:
        yield c


def publish_request(volume_id: str, node: str) -> pb.ControllerPublishVolumeRequest:
    return pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node, volume_capability=mount_cap())


def volumes(ctl, count: int) -> list[str]:
    return [ctl.stub.CreateVolume(create_request(unique())).volume.volume_id for _ in range(count)]


def clean_up(ctl, volume_ids: list[str]) -> None:
    for volume_id in volume_ids:
        ctl.stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=volume_id))
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


def test_a_node_with_as_many_volumes_as_its_limit_takes_no_more(ctl):
    ids = volumes(ctl, LIMIT + 1)
    try:
        for volume_id in ids[:LIMIT]:
            ctl.stub.ControllerPublishVolume(publish_request(volume_id, "full-node"))
        error = rpc_error(ctl.stub.ControllerPublishVolume, publish_request(ids[LIMIT], "full-node"))
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert f"node full-node already has {LIMIT} volume(s) published" in error.details()
        assert len(ctl.loop_devices()) == LIMIT  # nothing was connected for the refused one

        # Publishing a volume that is already published there again is not one more: still OK.
        again = ctl.stub.ControllerPublishVolume(publish_request(ids[0], "full-node"))
        assert again.publish_context["device_path"].startswith("/dev/loop")
        # Another node has its own count.
        ctl.stub.ControllerPublishVolume(publish_request(ids[LIMIT], "other-node"))
        # Room again once one is unpublished.
        ctl.stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=ids[1], node_id="full-node"))
        ctl.stub.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=ids[LIMIT], node_id="other-node")
        )
        ctl.stub.ControllerPublishVolume(publish_request(ids[LIMIT], "full-node"))
        listed = {
            e.volume.volume_id: list(e.status.published_node_ids)
            for e in ctl.stub.ListVolumes(pb.ListVolumesRequest()).entries
        }
        assert sorted(v for v in ids if listed[v] == ["full-node"]) == sorted([ids[0], ids[LIMIT]])
    finally:
        clean_up(ctl, ids)


def test_concurrent_publishes_to_one_node_never_pass_its_limit(ctl):
    """Six volumes published to one node at once, from the front's threads into two workers: exactly the
    limit succeed, the others are RESOURCE_EXHAUSTED (or ABORTED, retried), and the node never holds more."""
    ids = volumes(ctl, 6)
    try:

        def publish(volume_id: str) -> Code:
            while True:
                try:
                    ctl.stub.ControllerPublishVolume(publish_request(volume_id, "race-node"))
                    return Code.OK
                except grpc.RpcError as exc:
                    if exc.code() != Code.ABORTED:
                        return exc.code()

        with ThreadPoolExecutor(len(ids)) as threads:
            codes = list(threads.map(publish, ids))
        assert sorted(codes, key=str) == sorted([Code.OK] * LIMIT + [Code.RESOURCE_EXHAUSTED] * (6 - LIMIT), key=str)
        published = [
            e
            for e in ctl.stub.ListVolumes(pb.ListVolumesRequest()).entries
            if "race-node" in e.status.published_node_ids
        ]
        assert len(published) == LIMIT
        assert len(ctl.loop_devices()) == LIMIT
    finally:
        clean_up(ctl, ids)


@pytest.fixture(params=["sqlite"])
def per_backend(request, tmp_path):
    backends = [
        {
            "name": "small",
            "volume_driver": "mbs_csi.drivers.loopback.LoopbackDriver",
            "driver_options": {"loopback_dir": str(tmp_path / "small")},
            "max_volumes_per_node": 1,
        },
        {
            "name": "big",
            "volume_driver": "mbs_csi.drivers.loopback.LoopbackDriver",
            "driver_options": {"loopback_dir": str(tmp_path / "big")},
        },
    ]
    with controller_on(request, ("node-a",), {"backends": backends}) as c:
        yield c


def test_a_backend_limit_counts_only_that_backends_volumes(per_backend):
    ctl = per_backend
    made = [
        ctl.stub.CreateVolume(create_request(unique(), parameters={"backend": b})).volume.volume_id
        for b in ("small", "small", "big", "big")
    ]
    try:
        ctl.stub.ControllerPublishVolume(publish_request(made[0], "node-a"))
        error = rpc_error(ctl.stub.ControllerPublishVolume, publish_request(made[1], "node-a"))
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert "of backend small" in error.details()
        for volume_id in made[2:]:  # no limit on "big", and no limit in all
            ctl.stub.ControllerPublishVolume(publish_request(volume_id, "node-a"))
    finally:
        clean_up(ctl, made)


# --- alpha capabilities --------------------------------------------------------------------------------


def test_the_spec_marks_what_the_switch_hides():
    assert [RPC.Type.Name(t) for t in RPC.Type.values() if alpha.is_alpha(RPC.Type, t)] == [
        "VOLUME_CONDITION",
        "GET_VOLUME",
        "SINGLE_NODE_MULTI_WRITER",
        "GET_SNAPSHOT",
    ]


def test_alpha_capabilities_off_hides_them_and_keeps_the_calls():
    ctl = ControllerUnderTest(None, {"alpha_capabilities": False, "role": "all", "node_id": "alpha-node"})
    try:
        listed = {
            c.rpc.type for c in ctl.stub.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities
        }
        assert RPC.GET_SNAPSHOT not in listed and RPC.GET_VOLUME not in listed
        assert not [t for t in listed if alpha.is_alpha(RPC.Type, t)]
        assert {RPC.CREATE_DELETE_VOLUME, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS} <= listed
        node = csi_pb2_grpc.NodeStub(ctl.driver.channel)
        node_listed = {c.rpc.type for c in node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities}
        assert node_listed == {
            NODE_RPC.STAGE_UNSTAGE_VOLUME,
            NODE_RPC.GET_VOLUME_STATS,
            NODE_RPC.EXPAND_VOLUME,
            NODE_RPC.VOLUME_MOUNT_GROUP,
        }

        volume_id = ctl.stub.CreateVolume(create_request(unique())).volume.volume_id
        snapshot = ctl.stub.CreateSnapshot(
            pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=volume_id)
        ).snapshot
        try:  # the alpha calls still answer
            got = ctl.stub.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snapshot.snapshot_id)).snapshot
            assert got.snapshot_id == snapshot.snapshot_id
            assert (
                ctl.stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id)).volume.volume_id
                == volume_id
            )
        finally:
            ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
            ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    finally:
        ctl.close()


def test_alpha_capabilities_are_advertised_by_default(ctl):
    listed = {
        c.rpc.type for c in ctl.stub.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities
    }
    assert RPC.GET_SNAPSHOT in listed and RPC.GET_VOLUME in listed


# --- configuration ---------------------------------------------------------------------------------------


def test_the_limit_and_the_alpha_switch_are_read_from_file_env_and_flags(tmp_path):
    path = tmp_path / "mbs.yaml"
    backend = {"name": "b", "volume_driver": "x.Driver", "max_volumes_per_node": 3}
    path.write_text(yaml.safe_dump({"max_volumes_per_node": 8, "alpha_capabilities": False, "backends": [backend]}))
    settings = config.load_settings(str(path), env={})
    assert (settings.max_volumes_per_node, settings.alpha_capabilities) == (8, False)
    assert settings.backends[0].max_volumes_per_node == 3
    assert config.load_settings(env={"MBS_CSI_ALPHA_CAPABILITIES": "false"}).alpha_capabilities is False
    assert config.load_settings(flags={"alpha_capabilities": "yes"}).alpha_capabilities is True
    assert config.load_settings(env={}).alpha_capabilities is True


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"alpha_capabilities": "no"}, "alpha_capabilities"),  # a string in a file: not a boolean
        ({"backends": [{"name": "b", "volume_driver": "x.D", "max_volumes_per_node": -1}]}, "max_volumes_per_node"),
        ({"backends": [{"name": "b", "volume_driver": "x.D", "max_volumes_per_node": True}]}, "max_volumes_per_node"),
        ({"audit_interval": -5}, "audit_interval"),
    ],
)
def test_bad_values_are_configuration_errors(tmp_path, settings, key):
    path = tmp_path / "mbs.yaml"
    path.write_text(yaml.safe_dump(settings))
    with pytest.raises(errors.ConfigError, match=key):
        config.load_settings(str(path), env={})
    if key == "alpha_capabilities":
        with pytest.raises(errors.ConfigError, match="true or false"):
            config.load_settings(env={"MBS_CSI_ALPHA_CAPABILITIES": "perhaps"})
