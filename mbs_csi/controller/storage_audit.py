"""The audit's look at the storage and the database, in a backend worker (``mbs-csi controller audit``,
and the controller's periodic audit).

The storage is listed through Cinder's own manage API (``get_manageable_volumes`` and
``get_manageable_snapshots``, which most drivers implement; a driver without them is reported as
skipped), and only names made from cinder's templates with a UUID in them (``volume-<id>``,
``snapshot-<id>``) are considered: anything else on the storage is not ours to judge.

Order matters, because creates and deletes go on while the audit runs: the storage is listed *first*,
and the rows read after. A create records its row before the storage makes anything, so whatever the
listing saw has its row by the time the rows are read; rows newer than the audit's start, and rows
still ``creating``, are not compared at all. A delete removes the storage before the row, and a create
may finish between the listing and the reading: what the first look finds is looked at once more, and
only what both looks show is reported.

A row still ``creating`` long after any call could be making it is reported on its own: its create was
interrupted (a killed worker or front) and the CO never asked again. The CO never got its id, so no
PersistentVolume or VolumeSnapshotContent points at it; the next create of the same name removes it, or
DeleteVolume/DeleteSnapshot on its id does.
"""

from __future__ import annotations

import datetime
import re
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import sqlalchemy
from cinder.volume import volume_utils

from mbs_csi import errors
from mbs_csi.controller.attach_limits import backend_of
from mbs_csi.controller.backends import Backends
from mbs_csi.controller.records import (
    CONNECTION_TO_MISSING_NODE,
    DATABASE_STORE,
    INTERRUPTED_CREATE,
    RECORD_WITHOUT_SNAPSHOT,
    RECORD_WITHOUT_VOLUME,
    SNAPSHOT_WITHOUT_RECORD,
    TEMPORARY_LEFTOVER,
    VOLUME_WITHOUT_RECORD,
    AuditReport,
    Finding,
)

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A row in one of these states is one whose delete was asked for: with its storage gone, it is finished
# by forgetting the row (``--fix``).
DELETING = ("deleting", "error_deleting")
NOT_COMPARED = ("creating",)  # a create in progress: its storage may not exist yet

_PUBLICATIONS = sqlalchemy.text(
    "SELECT a.volume_id, a.attached_host, v.host FROM volume_attachment a JOIN volumes v ON v.id = a.volume_id "
    "WHERE a.deleted = :deleted AND v.deleted = :deleted"
)


class _Rows(NamedTuple):
    """The volume and snapshot rows one look read, and each volume's backend."""

    volumes: list[Any]
    snapshots: list[Any]
    backend_of_volume: dict[str, str]


def _ids(names: list[str], extract: Callable[[str], str | None]) -> dict[str, str]:
    """storage name -> id, for the names made from cinder's template around a UUID."""
    found = {}
    for name in names:
        resource_id = extract(name)
        if resource_id and _UUID.match(resource_id):
            found[name] = resource_id
    return found


def _naive(moment: datetime.datetime | None) -> datetime.datetime:
    if moment is None:
        return datetime.datetime.min
    return moment.astimezone(datetime.UTC).replace(tzinfo=None) if moment.tzinfo else moment


def _listed(list_resources: Any, known: list[dict[str, str]]) -> list[str]:
    """The storage names the driver's manage API lists (all of them: one page as big as it gets)."""
    return [entry["reference"]["source-name"] for entry in list_resources(known, None, sys.maxsize, 0, [], [])]


def audit(
    backends: Backends,
    persistence: Any,
    engine: sqlalchemy.engine.Engine,
    connector_store: str,
    stored_connector: Callable[[str], dict[str, Any] | None],
    interrupted_after: datetime.timedelta,
) -> AuditReport:
    """Storage against records (twice when the first look finds something: see :func:`_confirmed`),
    leftovers, creates ``creating`` for longer than ``interrupted_after``, and the publications."""
    findings, skipped, rows = _storage_against_records(backends, persistence)
    if findings:
        findings = _confirmed(findings, _storage_against_records(backends, persistence)[0])
    findings += _interrupted_creates(rows, interrupted_after)
    report_nodes, publications = _publications(engine, connector_store, stored_connector)
    return AuditReport(tuple(findings + report_nodes), tuple(publications), tuple(skipped))


def _interrupted_creates(rows: _Rows, interrupted_after: datetime.timedelta) -> list[Finding]:
    """Volume and snapshot rows ``creating`` since before ``interrupted_after`` ago (a group snapshot's
    members are snapshots)."""
    before = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - interrupted_after
    findings = []
    for kind, of_kind in (("volume", rows.volumes), ("snapshot", rows.snapshots)):
        for row in of_kind:
            if row.status not in NOT_COMPARED or _naive(row._ovo.created_at) >= before:
                continue
            volume_id = row.id if kind == "volume" else row.volume_id
            findings.append(
                Finding(
                    INTERRUPTED_CREATE,
                    rows.backend_of_volume.get(volume_id, ""),
                    row.id,
                    _interrupted_detail(kind, row),
                    volume_id=volume_id,
                )
            )
    return findings


def _confirmed(first: list[Finding], second: list[Finding]) -> list[Finding]:
    """The findings of the first look that the second still shows. A create or a delete running while the
    storage was listed and the rows read can look like an orphan for that moment (a delete removes the
    storage, then the row); it no longer does a look later."""
    again = {(f.kind, f.backend, f.name) for f in second}
    return [f for f in first if (f.kind, f.backend, f.name) in again]


def _storage_against_records(backends: Backends, persistence: Any) -> tuple[list[Finding], list[str], _Rows]:
    started = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    findings: list[Finding] = []
    skipped: list[str] = []
    listed: dict[str, tuple[dict[str, str], dict[str, str]]] = {}  # backend -> (volumes, snapshots) on storage
    for name in sorted(backends.errors):  # the storage first, then the rows: see the module docstring
        try:
            driver = backends.get(name).driver
            listed[name] = (
                _ids(_listed(driver.get_manageable_volumes, []), volume_utils.extract_id_from_volume_name),
                _ids(_listed(driver.get_manageable_snapshots, []), volume_utils.extract_id_from_snapshot_name),
            )
        except errors.CSIError as exc:
            skipped.append(f"backend {name}: {exc}")
            continue
        except NotImplementedError:
            skipped.append(f"backend {name}: its driver cannot list its volumes and snapshots (Cinder's manage API)")
            continue
        leftovers = getattr(driver, "leftovers", None)
        if leftovers is not None:
            detail = "temp file of an interrupted create or copy (nobody holds its lock)"
            findings += [Finding(TEMPORARY_LEFTOVER, name, tmp, detail, fixable=True) for tmp in leftovers()]
    volumes = persistence.get_volumes()
    snapshots = persistence.get_snapshots()
    backend_of_volume = {v.id: v.backend.id for v in volumes}
    for name, (volumes_on_storage, snapshots_on_storage) in listed.items():
        findings += _compare(
            name, "volume", volumes_on_storage, [v for v in volumes if v.backend.id == name], volumes, started
        )
        own_snapshots = [s for s in snapshots if backend_of_volume.get(s.volume_id) == name]
        findings += _compare(name, "snapshot", snapshots_on_storage, own_snapshots, snapshots, started)
    return findings, skipped, _Rows(volumes, snapshots, backend_of_volume)


def _compare(
    backend: str,
    kind: str,
    on_storage: dict[str, str],
    rows: list[Any],
    every_row: list[Any],
    started: datetime.datetime,
) -> list[Finding]:
    """Findings of one backend: its ``kind`` on the storage (name -> id) against its ``rows``."""
    without_record, without_storage = (
        (VOLUME_WITHOUT_RECORD, RECORD_WITHOUT_VOLUME)
        if kind == "volume"
        else (SNAPSHOT_WITHOUT_RECORD, RECORD_WITHOUT_SNAPSHOT)
    )
    recorded = {r.id for r in every_row}
    findings = [
        Finding(
            without_record,
            backend,
            storage_name,
            f"{kind} on the storage with no record: another deployment's sharing the storage, one made by hand, "
            "or data the database lost; never removed",
        )
        for storage_name, resource_id in sorted(on_storage.items())
        if resource_id not in recorded
    ]
    for row in rows:
        if row.status in NOT_COMPARED or _naive(row._ovo.created_at) >= started or row._ovo.name in on_storage:
            continue
        deleting = row.status in DELETING
        findings.append(
            Finding(
                without_storage,
                backend,
                row.id,
                f"{kind} {row._ovo.name} ({row.status}) is recorded but the storage does not have it"
                + ("; its delete was asked for: --fix finishes it" if deleting else ""),
                fixable=deleting,
                volume_id=row.id if kind == "volume" else row.volume_id,
            )
        )
    return findings


def _interrupted_detail(kind: str, row: Any) -> str:
    """What an interrupted create left, and the calls that clear it (the CO's retry, or a delete)."""
    since = f"has been creating since {_naive(row._ovo.created_at):%Y-%m-%d %H:%M:%S} UTC"
    why = "its create was interrupted and never retried. No PersistentVolume or snapshot content can point at it"
    group_snapshot_id = getattr(row._ovo, "group_snapshot_id", None)
    if group_snapshot_id:  # DeleteSnapshot refuses a member: its group snapshot is what is retried or deleted
        return (
            f"member {row.id} of group snapshot {group_snapshot_id} {since}: {why}; the next create of that group "
            f"snapshot's name removes it, and so does DeleteVolumeGroupSnapshot on {group_snapshot_id}"
        )
    name = row._ovo.display_name
    return (
        f"{kind} {name} {since}: {why}; the next create named {name} removes it, and so does "
        f"Delete{kind.capitalize()} on {row.id}"
    )


def _publications(
    engine: sqlalchemy.engine.Engine, connector_store: str, stored_connector: Callable[[str], dict[str, Any] | None]
) -> tuple[list[Finding], list[tuple[str, str, str]]]:
    """Connections to nodes gone from the database connector store (findings), or, for another store, every
    publication for the front to check."""
    with engine.connect() as connection:
        rows = connection.execute(_PUBLICATIONS, {"deleted": False}).all()
    if connector_store != DATABASE_STORE:
        return [], [(volume_id, node, backend_of(host)) for volume_id, node, host in rows]
    gone: dict[str, bool] = {}
    findings = []
    for volume_id, node, host in rows:
        if node not in gone:
            gone[node] = stored_connector(node) is None
        if gone[node]:
            findings.append(missing_node_finding(backend_of(host), volume_id, node, DATABASE_STORE))
    return findings, []


def missing_node_finding(backend: str, volume_id: str, node: str, store: str) -> Finding:
    return Finding(
        CONNECTION_TO_MISSING_NODE,
        backend,
        f"{volume_id}@{node}",
        f"volume {volume_id} is published to node {node}, which has no connector properties in the {store} store "
        "any more; --fix terminates the connection by force, as ControllerUnpublishVolume does",
        fixable=True,
        volume_id=volume_id,
        node_id=node,
    )
