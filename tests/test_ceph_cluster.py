"""The test Ceph cluster is real and usable the way the controller uses it: librados/librbd as
client.cinder with a conf file and a keyring, and Cinder's stock RBD driver through cinderlib."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import rados
import rbd

from testkit.ceph import CephCluster
from testkit.child import run_python_json
from testkit.host import short_tmpdir

GiB = 1 << 30


@pytest.fixture
def cinder_client(ceph: CephCluster) -> Iterator[rados.Rados]:
    """A librados connection as client.cinder, with the keyring given explicitly."""
    with rados.Rados(conffile=str(ceph.conf_path), rados_id=ceph.user, conf={"keyring": str(ceph.keyring_path)}) as c:
        yield c


def test_cluster_is_up_and_configured(ceph: CephCluster) -> None:
    assert ceph.ceph_json("health")["status"] == "HEALTH_OK"
    osd = ceph.ceph_json("osd", "stat")
    assert (osd["num_osds"], osd["num_up_osds"], osd["num_in_osds"]) == (1, 1, 1)
    assert "rbd" in ceph.ceph_json("osd", "pool", "application", "get", ceph.pool)
    [user] = ceph.ceph_json("auth", "get", f"client.{ceph.user}")
    assert user["caps"] == {"mon": "profile rbd", "osd": f"profile rbd pool={ceph.pool}"}
    assert user["key"] == ceph.key
    assert ceph.key in ceph.keyring_path.read_text()


def test_cephx_is_required(ceph: CephCluster, tmp_path: Path) -> None:
    other_key = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True, text=True, check=True)
    keyring = tmp_path / "wrong.keyring"
    keyring.write_text(ceph.keyring_path.read_text().replace(ceph.key, other_key.stdout.strip()))
    for conf in ({"keyring": str(keyring)}, {"keyring": "/dev/null", "auth_client_required": "none"}):
        client = rados.Rados(
            conffile=str(ceph.conf_path), rados_id=ceph.user, conf={**conf, "client_mount_timeout": "5"}
        )
        with pytest.raises(rados.PermissionDeniedError):
            client.connect()
        client.shutdown()


def test_rbd_lifecycle_as_cinder(ceph: CephCluster, cinder_client: rados.Rados) -> None:
    data = b"mbs-csi" * 512
    with cinder_client.open_ioctx(ceph.pool) as ioctx:
        rbd.RBD().create(ioctx, "vol", 1 * GiB)
        with rbd.Image(ioctx, "vol") as image:
            assert image.size() == GiB
            image.write(data, 0)
            image.create_snap("snap")
            image.protect_snap("snap")
        rbd.RBD().clone(ioctx, "vol", "snap", ioctx, "vol-clone")
        with rbd.Image(ioctx, "vol") as image:
            image.copy(ioctx, "vol-copy")
        with rbd.Image(ioctx, "vol-clone") as clone:
            clone.resize(2 * GiB)
            assert clone.size() == 2 * GiB
            assert clone.read(0, len(data)) == data
        with rbd.Image(ioctx, "vol-copy") as copy:
            assert copy.read(0, len(data)) == data
        assert sorted(rbd.RBD().list(ioctx)) == ["vol", "vol-clone", "vol-copy"]
        assert ceph.images() == ["vol", "vol-clone", "vol-copy"]

        rbd.RBD().remove(ioctx, "vol-clone")
        rbd.RBD().remove(ioctx, "vol-copy")
        with rbd.Image(ioctx, "vol") as image:
            image.unprotect_snap("snap")
            image.remove_snap("snap")
        rbd.RBD().remove(ioctx, "vol")
        assert rbd.RBD().list(ioctx) == []
    assert ceph.images() == []


def test_cinder_user_is_confined_to_its_pool(ceph: CephCluster, cinder_client: rados.Rados) -> None:
    ceph.ceph("osd", "pool", "create", "other", "8", "8", "replicated")
    try:
        ceph.rbd("pool", "init", "other")
        with cinder_client.open_ioctx("other") as ioctx:
            with pytest.raises(rbd.PermissionError):
                rbd.RBD().create(ioctx, "intruder", 1 * GiB)
            with pytest.raises(rados.PermissionError):
                ioctx.write_full("intruder", b"x")
        assert json.loads(ceph.rbd("ls", "--pool", "other", "--format", "json")) == []
    finally:
        ceph.ceph("osd", "pool", "rm", "other", "other", "--yes-i-really-really-mean-it")


def test_cinder_rbd_driver_through_cinderlib(ceph: CephCluster) -> None:
    workdir = short_tmpdir("mbs-cinderlib-")
    try:
        result = run_python_json(
            str(Path(__file__).with_name("rbd_cinderlib_child.py")),
            str(ceph.conf_path),
            str(ceph.keyring_path),
            str(workdir),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    stats = result["stats"]
    assert stats["volume_backend_name"] == "ceph"
    assert stats["storage_protocol"] == "ceph"
    assert stats["backend_state"] == "up"
    assert 0 < stats["free_capacity_gb"] <= stats["total_capacity_gb"]
    assert result["sizes"] == {"source": 1, "from-snapshot": 1, "clone": 2}

    # What ControllerPublishVolume gets back: monitors, user and, from rbd_keyring_conf, the keyring
    # itself, which must not travel in publish_context.
    conn = result["conn_info"]
    assert conn["driver_volume_type"] == "rbd"
    assert conn["data"]["hosts"] == ["127.0.0.1"]
    assert conn["data"]["ports"] == [str(ceph.mon_port_v1)]
    assert conn["data"]["auth_username"] == ceph.user
    assert conn["data"]["name"].startswith(f"{ceph.pool}/volume-")
    assert result["keyring_is_file_content"] is True

    assert ceph.images() == []
