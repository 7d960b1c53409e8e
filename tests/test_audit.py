"""``mbs-csi controller audit`` and the periodic audit's metric, with orphans planted by hand on a real
loopback backend and in the real database (SQLite and PostgreSQL) of a running controller."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

import pytest
import sqlalchemy

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc
from testkit.controller import ControllerUnderTest, controller_on, unique
from testkit.csi_requests import create_request, mount_cap
from testkit.host import free_port
from testkit.http import scrape
from testkit.wait import wait_until
from tests.test_node_loss import audit, by_kind, forget_connector


@pytest.fixture(params=["sqlite", "postgresql"])
def ctl(request):
    with controller_on(request, ("live-node",)) as controller:
        all_workers_up(controller)
        yield controller


def all_workers_up(ctl: ControllerUnderTest) -> None:
    """Every backend worker started: a worker starting removes the loopback leftovers it finds."""
    wait_until(lambda: len(ctl.ready_worker_pids()) == ctl.settings.backend_workers, 60, ctl.driver.log)


def execute(ctl: ControllerUnderTest, sql: str, **parameters: str) -> None:
    engine = sqlalchemy.create_engine(ctl.settings.database)
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(sql), parameters)
    finally:
        engine.dispose()


def plant_file(directory: Path, name: str) -> Path:
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(1024**3)
    return path


def test_audit_lists_planted_orphans_and_fixes_only_the_provable_ones(ctl):
    assert audit(ctl) == (0, {"findings": [], "counts": audit(ctl)[1]["counts"], "skipped": [], "fixed": []})

    # On the storage without a record: a volume and a snapshot named like ours.
    stray_volume = plant_file(ctl.loopback, f"volume-{uuid.uuid4()}")
    stray_snapshot = plant_file(ctl.loopback, f"snapshot-{uuid.uuid4()}")
    # Records without storage: a usable volume whose file vanished, and one whose delete failed.
    vanished, undeleted, published, healthy = (
        ctl.stub.CreateVolume(create_request(unique())).volume.volume_id for _ in range(4)
    )
    ctl.volume_file(vanished).unlink()
    ctl.volume_file(undeleted).unlink()
    execute(ctl, "UPDATE volumes SET status = 'error_deleting' WHERE id = :id", id=undeleted)
    # A connection to a node that is gone.
    gone_node = unique("node")
    ctl.register_nodes(gone_node)
    device = ctl.stub.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(volume_id=published, node_id=gone_node, volume_capability=mount_cap())
    ).publish_context["device_path"]
    ctl.stub.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(volume_id=healthy, node_id="live-node", volume_capability=mount_cap())
    )
    forget_connector(ctl.settings.database, gone_node)
    # A crashed create's temp file (after register_nodes, whose worker would remove it at its start).
    leftover = plant_file(ctl.loopback, f".tmp-volume-{uuid.uuid4()}")

    code, report = audit(ctl)
    assert code == 1
    assert by_kind(report) == {
        "volume_without_record": {stray_volume.name},
        "snapshot_without_record": {stray_snapshot.name},
        "temporary_leftover": {leftover.name},
        "record_without_volume": {vanished, undeleted},
        "connection_to_missing_node": {f"{published}@{gone_node}"},
    }
    assert report["counts"]["volume_without_record"] == 1 and report["counts"]["record_without_snapshot"] == 0
    assert leftover.exists()  # reported, not removed, without --fix

    code, report = audit(ctl, "--fix")
    assert code == 1  # what cannot be proven orphaned is still there
    assert by_kind(report) == {
        "volume_without_record": {stray_volume.name},
        "snapshot_without_record": {stray_snapshot.name},
        "record_without_volume": {vanished},
    }
    assert sorted(report["fixed"]) == sorted(
        [
            f"removed {leftover.name}",
            f"finished deleting volume {undeleted}",
            f"terminated the connection of volume {published} to node {gone_node}",
        ]
    )
    assert stray_volume.exists() and stray_snapshot.exists() and not leftover.exists()
    assert device not in ctl.loop_devices()
    listed = {e.volume.volume_id: e for e in ctl.stub.ListVolumes(pb.ListVolumesRequest()).entries}
    assert undeleted not in listed and list(listed[published].status.published_node_ids) == []
    assert list(listed[healthy].status.published_node_ids) == ["live-node"]  # a live node's connection is kept

    stray_volume.unlink()
    stray_snapshot.unlink()
    ctl.stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=healthy, node_id="live-node"))
    for volume_id in (vanished, published, healthy):
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    assert audit(ctl)[0] == 0


def test_audit_reports_creates_interrupted_and_never_retried(ctl):
    """A row still ``creating`` long after its call (a create killed after recording it, never retried) is
    reported, and nothing else is; the next create of its name, or a delete of its id, clears it."""
    long_ago = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - datetime.timedelta(hours=2)
    names = {kind: unique(kind) for kind in ("abandoned", "retried", "deleted", "source")}
    made = {kind: ctl.stub.CreateVolume(create_request(name)).volume.volume_id for kind, name in names.items()}
    source = made["source"]
    snapshot_name = unique("snap")
    snapshot = ctl.stub.CreateSnapshot(
        pb.CreateSnapshotRequest(name=snapshot_name, source_volume_id=source)
    ).snapshot.snapshot_id
    # As a create leaves its row when the process dies between recording it and finishing it.
    for kind in ("abandoned", "retried", "deleted"):
        ctl.execute(
            "UPDATE volumes SET status = 'creating', created_at = :at WHERE id = :id", at=long_ago, id=made[kind]
        )
    ctl.execute("UPDATE snapshots SET status = 'creating', created_at = :at WHERE id = :id", at=long_ago, id=snapshot)
    # A group snapshot's member: its group snapshot is what the CO retries or deletes.
    groups = csi_pb2_grpc.GroupControllerStub(ctl.driver.channel)
    group = groups.CreateVolumeGroupSnapshot(
        pb.CreateVolumeGroupSnapshotRequest(
            name=unique("group"), source_volume_ids=[source], parameters={"consistency": "loose"}
        )
    ).group_snapshot
    (member,) = [s.snapshot_id for s in group.snapshots]
    ctl.execute("UPDATE snapshots SET status = 'creating', created_at = :at WHERE id = :id", at=long_ago, id=member)
    # A create that may still be running: recorded just now.
    running = ctl.stub.CreateVolume(create_request(unique())).volume.volume_id
    ctl.execute("UPDATE volumes SET status = 'creating' WHERE id = :id", id=running)

    code, report = audit(ctl)
    assert code == 1
    assert by_kind(report) == {
        "interrupted_create": {made["abandoned"], made["retried"], made["deleted"], snapshot, member},
    }
    detail = next(f["detail"] for f in report["findings"] if f["name"] == made["abandoned"])
    assert f"the next create named {names['abandoned']} removes it" in detail
    assert f"DeleteVolume on {made['abandoned']}" in detail
    detail = next(f["detail"] for f in report["findings"] if f["name"] == member)
    assert f"DeleteVolumeGroupSnapshot on {group.group_snapshot_id}" in detail
    assert not any(f["fixable"] for f in report["findings"])
    assert audit(ctl, "--fix")[1]["fixed"] == []  # the CO may still retry: never removed by the audit

    # The CO's retry of the same name removes the leftover and makes the volume anew.
    retried = ctl.stub.CreateVolume(create_request(names["retried"])).volume.volume_id
    assert retried != made["retried"] and not ctl.volume_file(made["retried"]).exists()
    ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=made["deleted"]))
    assert not ctl.volume_file(made["deleted"]).exists()
    again = ctl.stub.CreateSnapshot(pb.CreateSnapshotRequest(name=snapshot_name, source_volume_id=source)).snapshot
    assert again.snapshot_id != snapshot and again.ready_to_use
    groups.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id, snapshot_ids=[member])
    )
    assert by_kind(audit(ctl)[1]) == {"interrupted_create": {made["abandoned"]}}

    ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=made["abandoned"]))
    ctl.execute("UPDATE volumes SET status = 'available' WHERE id = :id", id=running)
    ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=again.snapshot_id))
    for volume_id in (retried, source, running):
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    assert audit(ctl) == (0, {"findings": [], "counts": audit(ctl)[1]["counts"], "skipped": [], "fixed": []})


def test_the_controller_audits_periodically_and_exports_the_counts():
    port = free_port()
    # One backend worker, ready before the driver is: no worker starts later (a starting worker removes the
    # loopback leftovers it finds) but the audit's own, which keeps them.
    extra = {"audit_interval": 1, "metrics_endpoint": f"127.0.0.1:{port}", "backend_workers": 1}
    ctl = ControllerUnderTest(None, extra)
    try:
        key = 'mbs_csi_audit_findings{kind="temporary_leftover"}'
        wait_until(lambda: scrape(port).get(key) == 0.0, 60, lambda: f"{scrape(port)}; {ctl.driver.log()}")
        leftover = plant_file(ctl.loopback, f".tmp-volume-{uuid.uuid4()}")
        wait_until(lambda: scrape(port).get(key) == 1.0, 30, lambda: str(scrape(port)))
        assert scrape(port)['mbs_csi_audit_findings{kind="volume_without_record"}'] == 0.0
        assert leftover.exists()  # the periodic audit only reports
        # CSI calls go on while it runs: they never wait for the audit's worker.
        volume_id = ctl.stub.CreateVolume(create_request(unique())).volume.volume_id
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
        leftover.unlink()
        wait_until(lambda: scrape(port).get(key) == 0.0, 30, lambda: str(scrape(port)))

        # Volumes and snapshots made and deleted while it audits every second are never orphans.
        mark = len(ctl.driver.log())
        seen: set[tuple[str, float]] = set()
        for _ in range(20):
            volume_id = ctl.stub.CreateVolume(create_request(unique())).volume.volume_id
            snapshot_id = ctl.stub.CreateSnapshot(
                pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=volume_id)
            ).snapshot.snapshot_id
            ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))
            ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
            seen |= {(k, v) for k, v in scrape(port).items() if k.startswith("mbs_csi_audit_findings")}
        assert {v for _, v in seen} == {0.0}, sorted(seen)
        assert "audit:" not in ctl.driver.log()[mark:]  # and no finding was logged
    finally:
        ctl.close()
