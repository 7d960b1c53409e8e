"""Two controller replicas on one real PostgreSQL: each sidecar elects its own leader, so calls for one
volume may reach different replicas; the per-volume locks are PostgreSQL advisory locks that both see.
A lock held by another session (what a call in flight in the other replica holds) makes a conflicting
call ABORTED in either replica; shared holds (snapshots of one volume) still run together."""

from __future__ import annotations

import uuid

import grpc
import psycopg2
import pytest

from csi import csi_pb2 as pb
from mbs_csi.inflight import lock_id
from testkit.controller import ControllerUnderTest, loopback_backend
from testkit.csi_requests import create_request
from testkit.host import short_tmpdir
from testkit.rpc import rpc_error


@pytest.fixture(scope="module")
def replicas(postgres):
    database = postgres.new_database(f"replicas_{uuid.uuid4().hex[:8]}")
    shared = short_tmpdir("mbs-replicas-")  # both replicas reach the same "storage"
    first = ControllerUnderTest(database, backends=[loopback_backend(shared / "loopback")])
    second = ControllerUnderTest(database, backends=[loopback_backend(shared / "loopback")])
    yield first, second, database
    first.close()
    second.close()


def test_a_call_in_flight_in_one_replica_aborts_a_conflicting_call_in_the_other(replicas):
    first, second, database = replicas
    volume = first.stub.CreateVolume(create_request(f"pvc-{uuid.uuid4().hex[:8]}")).volume
    other_replica = psycopg2.connect(database)
    try:
        with other_replica.cursor() as cursor:
            # A DeleteVolume in flight elsewhere holds the volume exclusively.
            cursor.execute("SELECT pg_advisory_lock(%s)", (lock_id(f"volume:{volume.volume_id}"),))
            for replica in (first, second):
                error = rpc_error(replica.stub.DeleteVolume, pb.DeleteVolumeRequest(volume_id=volume.volume_id))
                assert error.code() == grpc.StatusCode.ABORTED
                assert "already in progress in another controller replica" in error.details()
                snapshot = pb.CreateSnapshotRequest(name="snap-blocked", source_volume_id=volume.volume_id)
                assert rpc_error(replica.stub.CreateSnapshot, snapshot).code() == grpc.StatusCode.ABORTED
            cursor.execute("SELECT pg_advisory_unlock_all()")

            # A snapshot in flight elsewhere holds it shared: another snapshot runs, a delete waits.
            cursor.execute("SELECT pg_advisory_lock_shared(%s)", (lock_id(f"volume:{volume.volume_id}"),))
            made = second.stub.CreateSnapshot(
                pb.CreateSnapshotRequest(name=f"snap-{uuid.uuid4().hex[:8]}", source_volume_id=volume.volume_id)
            ).snapshot
            error = rpc_error(first.stub.DeleteVolume, pb.DeleteVolumeRequest(volume_id=volume.volume_id))
            assert error.code() == grpc.StatusCode.ABORTED
            cursor.execute("SELECT pg_advisory_unlock_all()")
    finally:
        other_replica.close()

    # Locks are released after each call: the replicas work on each other's volumes.
    first.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=made.snapshot_id))
    second.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert first.backend_volume_files() == []


def test_a_replica_that_lost_its_database_answers_unavailable_and_holds_no_lock(postgres):
    """A dead database: the call fails at once with the reason, and nothing stays locked."""
    database = postgres.new_database(f"gone_{uuid.uuid4().hex[:8]}")
    ctl = ControllerUnderTest(database)
    try:
        volume = ctl.stub.CreateVolume(create_request(f"pvc-{uuid.uuid4().hex[:8]}")).volume
        admin = psycopg2.connect(postgres.url(database="postgres"))
        admin.autocommit = True
        name = database.rsplit("/", 1)[1]
        with admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            error = rpc_error(ctl.stub.DeleteVolume, pb.DeleteVolumeRequest(volume_id=volume.volume_id))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot lock in database postgresql://postgres@127.0.0.1" in error.details()
        finally:
            with admin.cursor() as cursor:
                cursor.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            admin.close()
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
        assert ctl.backend_volume_files() == []
    finally:
        ctl.close()
