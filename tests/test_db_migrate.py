"""``mbs-csi db migrate``: the controller's state moved from SQLite to a real PostgreSQL through the real
command, then served by the real driver on PostgreSQL; the refusal of a target that is not empty; and a
``kill -9`` in the middle of the copy, which leaves the target empty."""

from __future__ import annotations

import shutil
import sqlite3
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy
import yaml

from csi import csi_pb2 as pb
from testkit.controller import ControllerUnderTest, unique
from testkit.csi_requests import GIB, create_request, mount_cap
from testkit.driver import driver_env, run_cli
from testkit.host import REPO, short_tmpdir
from testkit.postgres import PostgresCluster
from testkit.processes import ProcessTree
from testkit.wait import wait_until


def migrate(source: str, target: str) -> tuple[int, str]:
    done = run_cli("db", "migrate", "--from", source, "--to", target, timeout=120)
    return done.returncode, done.stdout + done.stderr


def tables(url: str) -> list[str]:
    engine = sqlalchemy.create_engine(url)
    try:
        return sorted(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def sqlite_url(controller: ControllerUnderTest) -> str:
    return f"sqlite:///{controller.state}/mbs-csi.sqlite"


@pytest.fixture
def seeded_sqlite() -> Iterator[str]:
    """A controller database with the driver's schema and seed rows, made by ``backend check``."""
    workdir = short_tmpdir("mbs-mig-")
    try:
        done = run_cli("backend", "check", "--state-dir", str(workdir), timeout=120)
        assert done.returncode == 0, done.stderr
        yield f"sqlite:///{workdir}/mbs-csi.sqlite"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
def test_sqlite_to_postgresql_keeps_every_volume_snapshot_and_publish(postgres: PostgresCluster):
    controller = ControllerUnderTest(None)
    try:
        controller.register_nodes("node-a")
        stub = controller.stub
        names = [unique(), unique()]
        first, second = (stub.CreateVolume(create_request(n, required=GIB)).volume for n in names)
        snap = stub.CreateSnapshot(
            pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=first.volume_id)
        ).snapshot
        published = stub.ControllerPublishVolume(
            pb.ControllerPublishVolumeRequest(
                volume_id=second.volume_id, node_id="node-a", volume_capability=mount_cap()
            )
        ).publish_context
        assert controller.driver.stop() == 0
        controller.driver.close()

        target = postgres.new_database("migrated")
        code, output = migrate(sqlite_url(controller), target)
        assert code == 0, output
        assert "volumes: 2" in output and "snapshots: 1" in output and "volume_attachment: 1" in output

        # The driver, now on PostgreSQL, finds everything.
        settings = yaml.safe_load(controller.config_path.read_text())
        controller.config_path.write_text(yaml.safe_dump({**settings, "database": target}))
        controller.start()
        stub = controller.stub
        listed = {
            e.volume.volume_id: list(e.status.published_node_ids)
            for e in stub.ListVolumes(pb.ListVolumesRequest()).entries
        }
        assert listed == {first.volume_id: [], second.volume_id: ["node-a"]}
        snapshots = stub.ListSnapshots(pb.ListSnapshotsRequest()).entries
        assert [(s.snapshot.snapshot_id, s.snapshot.source_volume_id) for s in snapshots] == [
            (snap.snapshot_id, first.volume_id)
        ]
        # Idempotent calls answer what they answered on SQLite.
        assert stub.CreateVolume(create_request(names[0], required=GIB)).volume.volume_id == first.volume_id
        again = stub.ControllerPublishVolume(
            pb.ControllerPublishVolumeRequest(
                volume_id=second.volume_id, node_id="node-a", volume_capability=mount_cap()
            )
        ).publish_context
        assert again == published
        # node-a's connector properties came along: a new publish finds them.
        stub.ControllerPublishVolume(
            pb.ControllerPublishVolumeRequest(
                volume_id=first.volume_id, node_id="node-a", volume_capability=mount_cap()
            )
        )
        # New rows go in after the copied ones (PostgreSQL's sequences moved past the copied ids).
        third = stub.CreateVolume(create_request(unique(), required=GIB)).volume
        # And everything can be removed, from the storage too.
        stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        for volume in (first, second):
            stub.ControllerUnpublishVolume(
                pb.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id="node-a")
            )
        for volume in (first, second, third):
            stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))
        assert list(stub.ListVolumes(pb.ListVolumesRequest()).entries) == []
        assert controller.backend_volume_files() == []
    finally:
        controller.close()


@pytest.mark.slow
def test_a_target_that_is_not_empty_is_refused_and_left_as_it_was(postgres: PostgresCluster, seeded_sqlite: str):
    target = postgres.new_database("not_empty")
    code, output = migrate(seeded_sqlite, target)
    assert code == 0, output
    before = tables(target)
    code, output = migrate(seeded_sqlite, target)
    assert code == 1 and "refused: the target database is not empty" in output, output
    assert tables(target) == before
    # Nor a source with a table this version would not copy.
    with sqlite3.connect(seeded_sqlite.removeprefix("sqlite:///")) as db:
        db.execute("CREATE TABLE someone_elses (id INTEGER PRIMARY KEY)")
    untouched = postgres.new_database("unknown_table")
    code, output = migrate(seeded_sqlite, untouched)
    assert code == 1 and "tables this version does not know: someone_elses" in output, output
    assert tables(untouched) == []
    # Nor a source that holds no driver state: the empty database is refused, nothing is written.
    empty = postgres.new_database("no_state")
    code, output = migrate(empty, postgres.new_database("untouched"))
    assert code == 1 and "holds no mbs-csi state" in output, output


@pytest.mark.slow
def test_a_migration_killed_mid_copy_leaves_the_target_empty(postgres: PostgresCluster, seeded_sqlite: str):
    """kill -9 once the target's transaction has the schema and is inserting rows: PostgreSQL rolls it all
    back. Enough connector rows make the copy last long enough to be caught in the middle."""
    with sqlite3.connect(seeded_sqlite.removeprefix("sqlite:///")) as db:
        db.executemany(
            "INSERT INTO cinderlib_persistence_key_value (key, value) VALUES (?, ?)",
            ((f"mbs-csi-connector-node-{i}", "{}" * 200) for i in range(100_000)),
        )
    target = postgres.new_database("killed")
    watcher = sqlalchemy.create_engine(postgres.url())
    tree = ProcessTree(
        [sys.executable, "-m", "mbs_csi", "db", "migrate", "--from", seeded_sqlite, "--to", target],
        driver_env(),
        cwd=REPO,
    )
    try:

        def copying() -> bool:
            with watcher.connect() as connection:
                return bool(
                    connection.execute(
                        sqlalchemy.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'killed'"
                            " AND backend_xid IS NOT NULL AND query LIKE 'INSERT INTO cinderlib_persistence_key_value%'"
                        )
                    ).scalar()
                )

        wait_until(copying, 60, "the migration inserting connector rows", interval=0.01)
    finally:
        tree.kill()
    assert tree.proc.returncode == -9

    def ended() -> bool:
        with watcher.connect() as connection:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = 'killed'"
            return not connection.execute(sqlalchemy.text(query)).scalar()

    wait_until(ended, 30, "the killed migration's session to end")
    watcher.dispose()
    assert tables(target) == []
    # The target is as it was: the migration can run again, to the end.
    code, output = migrate(seeded_sqlite, target)
    assert code == 0, output
    assert "cinderlib_persistence_key_value: 100000" in output


def test_db_migrate_needs_both_urls():
    done = run_cli("db", "migrate", "--from", "sqlite:////nonexistent/x.sqlite")
    assert done.returncode == 2 and "--to" in done.stderr


@pytest.mark.slow
def test_postgresql_back_to_sqlite_keeps_every_row_as_it_was(postgres: PostgresCluster, seeded_sqlite: str):
    """SQLite -> PostgreSQL -> SQLite: every row of every table reads back equal (booleans, dates, ids)."""
    from mbs_csi.controller.migration import schema

    middle = postgres.new_database("round_trip")
    back = seeded_sqlite.replace("mbs-csi.sqlite", "back.sqlite")
    for source, target in ((seeded_sqlite, middle), (middle, back)):
        code, output = migrate(source, target)
        assert code == 0, output

    def content(url: str) -> dict[str, list[tuple[object, ...]]]:
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect() as connection:
                return {
                    table.name: sorted(map(tuple, connection.execute(sqlalchemy.select(table))), key=repr)
                    for table in schema().sorted_tables
                }
        finally:
            engine.dispose()

    original = content(seeded_sqlite)
    assert original["volume_types"] and original["quota_classes"] and original["workers"]
    assert content(back) == original


def test_a_password_in_a_url_is_never_printed(tmp_path):
    """A database that cannot be reached: the command fails with the driver's reason, and neither URL's
    password shows (the target, an SQLite file, is not even created)."""
    target = tmp_path / "target.sqlite"
    code, output = migrate("postgresql://mbs:s3cret-pw@127.0.0.1:1/mbs", f"sqlite:///{target}")
    assert code == 1 and "failed, the target is left as it was" in output and "Connection refused" in output, output
    assert "s3cret-pw" not in output
    assert not target.exists()
