"""How the controller answers when the storage or the database fails it, through the real ``mbs-csi``
process, cinderlib, the loopback backend and both databases: sizes the storage cannot hold are
OUT_OF_RANGE and leave every volume as it was, a database that cannot be used is UNAVAILABLE, and names
and ids beyond CSI's limits are INVALID_ARGUMENT before any database sees them."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg2
import pytest

from csi import csi_pb2 as pb
from testkit.controller import ControllerUnderTest, controller_on, unique
from testkit.csi_requests import GIB, block_cap, create_request, mount_cap
from testkit.postgres import PostgresCluster
from testkit.rpc import rpc_error
from testkit.wait import wait_until

Code = grpc.StatusCode

# Seconds a backend call may take. On PostgreSQL the workers' lock waits give up after a share of it.
BACKEND_TIMEOUT = 30
LARGEST_REQUEST = 2**63 - 1  # bytes: the most a CapacityRange can ask for


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ctl(request: pytest.FixtureRequest) -> Iterator[ControllerUnderTest]:
    with controller_on(request, ("node-a",), {"backend_timeout": BACKEND_TIMEOUT}) as controller:
        yield controller


def create(ctl: ControllerUnderTest, **kwargs: object) -> pb.Volume:
    return ctl.stub.CreateVolume(create_request(unique(), **kwargs)).volume  # type: ignore[arg-type]


def expand_request(volume_id: str, required: int) -> pb.ControllerExpandVolumeRequest:
    return pb.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=required)
    )


def publish_request(volume_id: str) -> pb.ControllerPublishVolumeRequest:
    return pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id="node-a", volume_capability=block_cap())


def volume_ids(ctl: ControllerUnderTest) -> set[str]:
    return {e.volume.volume_id for e in ctl.stub.ListVolumes(pb.ListVolumesRequest()).entries}


def size_the_filesystem_refuses(directory: Path) -> int:
    """32 TiB, when the filesystem under ``directory`` cannot hold a file that large (ext4 with 4 KiB
    blocks holds at most 16 TiB); the test is skipped on a filesystem that can."""
    size = 32 * 1024 * GIB
    with tempfile.TemporaryFile(dir=directory) as probe:
        try:
            os.ftruncate(probe.fileno(), size)
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                return size
            raise
    pytest.skip(f"the filesystem under {directory} holds a file of {size} bytes")


# --- sizes ---------------------------------------------------------------------------------------------


def test_a_size_the_storage_cannot_hold_is_out_of_range_and_leaves_nothing(ctl: ControllerUnderTest) -> None:
    too_large = size_the_filesystem_refuses(ctl.loopback)
    before = volume_ids(ctl), ctl.backend_volume_files()
    for required in (too_large, LARGEST_REQUEST):
        error = rpc_error(ctl.stub.CreateVolume, create_request(unique(), required=required))
        assert error.code() == Code.OUT_OF_RANGE, error.details()
    assert (volume_ids(ctl), ctl.backend_volume_files()) == before
    assert not list(ctl.loopback.glob(".tmp-*"))


def test_an_expand_the_storage_refuses_leaves_the_volume_as_it_was(ctl: ControllerUnderTest) -> None:
    too_large = size_the_filesystem_refuses(ctl.loopback)
    volume = create(ctl, caps=[block_cap()])
    ctl.stub.ControllerPublishVolume(publish_request(volume.volume_id))
    for required in (too_large, LARGEST_REQUEST):
        error = rpc_error(ctl.stub.ControllerExpandVolume, expand_request(volume.volume_id, required))
        assert error.code() == Code.OUT_OF_RANGE, error.details()

    answer = ctl.stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert answer.volume.capacity_bytes == GIB
    assert list(answer.status.published_node_ids) == ["node-a"]
    assert not answer.status.volume_condition.abnormal
    ctl.stub.ControllerPublishVolume(publish_request(volume.volume_id))  # still published there: fine
    assert volume.volume_id in volume_ids(ctl)
    grown = ctl.stub.ControllerExpandVolume(expand_request(volume.volume_id, 2 * GIB))
    assert grown.capacity_bytes == 2 * GIB
    assert os.path.getsize(ctl.volume_file(volume.volume_id)) == 2 * GIB

    ctl.stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id))
    ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_a_failed_expand_keeps_the_volume_served(ctl: ControllerUnderTest) -> None:
    """Whatever the storage's failure, the volume stays as it was recorded: found, and deletable."""
    volume = create(ctl)
    ctl.volume_file(volume.volume_id).unlink()  # the storage lost it: growing it fails
    error = rpc_error(ctl.stub.ControllerExpandVolume, expand_request(volume.volume_id, 2 * GIB))
    assert error.code() == Code.INTERNAL
    assert "does not exist" in error.details()
    answer = ctl.stub.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert answer.volume.capacity_bytes == GIB
    assert answer.status.volume_condition.abnormal
    ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert volume.volume_id not in volume_ids(ctl)


# --- names and ids -------------------------------------------------------------------------------------

LONG = "é" * 65  # 130 bytes in UTF-8
NUL = "pvc-\0-x"
SIZE = pb.CapacityRange(required_bytes=GIB)

BAD_IDENTIFIERS = [
    ("CreateVolume", create_request(LONG), "name is 130 bytes long; CSI allows at most 128"),
    ("CreateVolume", create_request(NUL), "name contains a NUL byte"),
    ("CreateVolume", create_request("pvc-x", snapshot=NUL), "volume_content_source.snapshot.snapshot_id contains"),
    ("CreateVolume", create_request("pvc-x", volume=LONG), "volume_content_source.volume.volume_id is 130 bytes"),
    ("DeleteVolume", pb.DeleteVolumeRequest(volume_id=NUL), "volume_id contains a NUL byte"),
    (
        "ControllerPublishVolume",
        pb.ControllerPublishVolumeRequest(volume_id="v", node_id=LONG, volume_capability=mount_cap()),
        "node_id is 130 bytes",
    ),
    ("ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(volume_id=NUL), "volume_id contains"),
    (
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(volume_id=LONG, volume_capabilities=[mount_cap()]),
        "volume_id is 130 bytes",
    ),
    ("ControllerExpandVolume", pb.ControllerExpandVolumeRequest(volume_id=NUL, capacity_range=SIZE), "volume_id"),
    ("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=LONG), "volume_id is 130 bytes"),
    ("CreateSnapshot", pb.CreateSnapshotRequest(name=NUL, source_volume_id="v"), "name contains a NUL byte"),
    ("CreateSnapshot", pb.CreateSnapshotRequest(name="s", source_volume_id=LONG), "source_volume_id is 130"),
    ("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=NUL), "snapshot_id contains a NUL byte"),
    ("GetSnapshot", pb.GetSnapshotRequest(snapshot_id=LONG), "snapshot_id is 130 bytes"),
    ("ListSnapshots", pb.ListSnapshotsRequest(source_volume_id=NUL), "source_volume_id contains a NUL byte"),
]


@pytest.mark.parametrize(
    ("rpc", "request_", "message"), BAD_IDENTIFIERS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_IDENTIFIERS)]
)
def test_names_and_ids_beyond_csi_limits_are_invalid_arguments(
    ctl: ControllerUnderTest, rpc: str, request_: object, message: str
) -> None:
    before = volume_ids(ctl)
    error = rpc_error(getattr(ctl.stub, rpc), request_)
    assert error.code() == Code.INVALID_ARGUMENT, error.details()
    assert message in error.details()
    assert volume_ids(ctl) == before


def test_a_name_of_128_bytes_is_fine(ctl: ControllerUnderTest) -> None:
    name = "n" * 128
    volume = ctl.stub.CreateVolume(create_request(name)).volume
    assert ctl.stub.CreateVolume(create_request(name)).volume.volume_id == volume.volume_id
    ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))


# --- the database --------------------------------------------------------------------------------------


@contextlib.contextmanager
def volumes_table_held(database: str) -> Iterator[None]:
    """Another session holds cinder's volumes table against writers (it still lets them read)."""
    if database.startswith("postgresql"):
        with contextlib.closing(psycopg2.connect(database)) as session, session.cursor() as cursor:
            cursor.execute("LOCK TABLE volumes IN EXCLUSIVE MODE")
            yield
            session.rollback()
    else:
        session = sqlite3.connect(database.removeprefix("sqlite:///"), isolation_level=None)
        try:
            session.execute("BEGIN IMMEDIATE")  # SQLite's write lock
            yield
            session.execute("ROLLBACK")
        finally:
            session.close()


def test_a_database_held_by_another_session_answers_unavailable(ctl: ControllerUnderTest) -> None:
    """A write that cannot get its lock fails in time (on PostgreSQL before the call's bound) as
    UNAVAILABLE, with nothing made; the CO's retry succeeds once the lock is free."""
    name = unique()
    before = ctl.backend_volume_files()
    with volumes_table_held(ctl.settings.database):
        error = rpc_error(ctl.stub.CreateVolume, create_request(name))
        assert error.code() == Code.UNAVAILABLE, error.details()
        assert "the database cannot be reached or used right now" in error.details()
        assert ctl.backend_volume_files() == before
    volume = ctl.stub.CreateVolume(create_request(name)).volume
    assert ctl.volume_file(volume.volume_id).exists()
    ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_a_postgresql_that_goes_away_answers_unavailable_until_it_is_back() -> None:
    cluster = PostgresCluster()  # its own: this test stops it
    try:
        ctl = ControllerUnderTest(cluster.url())
        try:
            volume = ctl.stub.CreateVolume(create_request(unique())).volume
            get = pb.ControllerGetVolumeRequest(volume_id=volume.volume_id)
            cluster.stop()
            for call, request in (
                (ctl.stub.ControllerGetVolume, get),
                (ctl.stub.ListVolumes, pb.ListVolumesRequest()),
                (ctl.stub.ListSnapshots, pb.ListSnapshotsRequest()),
            ):
                error = rpc_error(call, request)
                assert error.code() == Code.UNAVAILABLE, error.details()
            cluster.start()

            def served() -> bool:
                with contextlib.suppress(grpc.RpcError):
                    return ctl.stub.ControllerGetVolume(get).volume.volume_id == volume.volume_id
                return False

            wait_until(served, 120, "the controller to serve again once PostgreSQL is back")
            ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
        finally:
            ctl.close()
    finally:
        cluster.destroy()
