"""Group snapshots on Cinder's own model, in a backend worker: the operations behind the GroupController.

cinderlib has no group API, so this module does what cinder-volume's manager does, on the same
database: a CSI group snapshot is a cinder *group* of a generic group type (``mbs-csi-generic``, made
once) holding the source volumes, a *group snapshot* of it, and one cinder snapshot per volume (its
``group_snapshot_id`` set), each a normal CSI snapshot. The driver's ``create_group`` /
``create_group_snapshot`` / ``delete_group_snapshot`` / ``delete_group`` are called where it has them;
where it has none (``NotImplementedError``), the generic fallback of cinder's manager: nothing to make for
the group, and one driver snapshot after the other for the group snapshot.

Only drivers reporting ``consistent_group_snapshot_enabled`` take the member snapshots at one point in
time; for the others a group snapshot is refused (FailedPrecondition) unless the caller accepts
snapshots taken one after the other (``loose``).

The volumes' own ``group_id`` is left alone: a volume may belong to any number of CSI group snapshots,
and cinder's column holds one group. The membership is in the member snapshots.

Crash safety, as for single snapshots: the group, its group snapshot and every member snapshot are
recorded (status ``creating``) in one transaction before the storage is touched, and marked
``available`` together once the storage made them all. A create that fails is undone at once; a create
cut short by a crash is found by the next request for the same name, which deletes whatever the storage
holds under it and starts again; a delete removes the member snapshots from the storage first and the
group's rows last, so a retry after a crash finishes it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy
from cinder import exception as cinder_exception
from cinder import objects as cinder_objects
from cinder.db.sqlalchemy import api as cinder_db
from cinder.db.sqlalchemy import models
from cinderlib import objects

from mbs_csi import errors
from mbs_csi.controller.backends import Backends
from mbs_csi.controller.cinder_records import epoch, snapshot_record
from mbs_csi.controller.records import GroupSnapshotRecord
from mbs_csi.controller.rows import Rows
from mbs_csi.controller.stats import summarize_stats

log = logging.getLogger("mbs_csi.groups")

GROUP_TYPE_NAME = "mbs-csi-generic"
# A fixed id: two workers making the type at the same time cannot make two.
GROUP_TYPE_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "mbs-csi/group-type/generic"))
AVAILABLE = "available"
CREATING = "creating"

_NAMED = sqlalchemy.text("SELECT id FROM group_snapshots WHERE name = :name AND deleted = :deleted")
_MEMBERS = sqlalchemy.text("SELECT id FROM snapshots WHERE group_snapshot_id = :id AND deleted = :deleted")
_MAPPINGS = models.GroupVolumeTypeMapping.__table__
_GROUPS = models.Group.__table__
_GROUP_SNAPSHOTS = models.GroupSnapshot.__table__


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _backend_name(host: str) -> str:
    return host.split("@")[-1].split("#")[0]  # host is "host@backend#pool"


class Groups:
    def __init__(
        self,
        engine: sqlalchemy.engine.Engine,
        rows: Rows,
        backends: Backends,
        require_volume: Callable[[str], objects.Volume],
        destroy_snapshot: Callable[[objects.Snapshot], None],
    ) -> None:
        self._engine = engine
        self._rows = rows
        self._backends = backends
        self._require_volume = require_volume
        self._destroy_snapshot = destroy_snapshot
        self._type_made = False

    # --- reads --------------------------------------------------------------------------------------

    def _ids(self, query: sqlalchemy.TextClause, **values: str) -> list[str]:
        with self._engine.connect() as connection:
            return [row[0] for row in connection.execute(query, {**values, "deleted": False})]

    def _load(self, group_snapshot_id: str) -> tuple[Any, list[objects.Snapshot]] | None:
        """The cinder group snapshot and its member snapshots, or None."""
        try:
            group_snapshot = cinder_objects.GroupSnapshot.get_by_id(objects.CONTEXT, group_snapshot_id)
        except cinder_exception.GroupSnapshotNotFound:
            return None
        members = [self._rows.snapshot(i) for i in self._ids(_MEMBERS, id=group_snapshot_id)]
        return group_snapshot, [m for m in members if m is not None]

    @staticmethod
    def _record(group_snapshot: Any, members: list[objects.Snapshot]) -> GroupSnapshotRecord:
        return GroupSnapshotRecord(
            id=group_snapshot.id,
            name=group_snapshot.name or "",
            status=group_snapshot.status,
            created_at=epoch(group_snapshot),
            snapshots=tuple(sorted((snapshot_record(m) for m in members), key=lambda s: s.volume_id)),
        )

    def get(self, group_snapshot_id: str) -> GroupSnapshotRecord | None:
        found = self._load(group_snapshot_id)
        return self._record(*found) if found else None

    # --- create -------------------------------------------------------------------------------------

    def create(self, name: str, volume_ids: list[str], loose: bool) -> GroupSnapshotRecord:
        for leftover_id in self._ids(_NAMED, name=name):
            found = self._load(leftover_id)
            if found is None:
                continue
            if found[0].status == AVAILABLE:
                return self._record(*found)
            log.info(
                "removing leftover group snapshot %s (%s) of an earlier failed create of %s",
                leftover_id,
                found[0].status,
                name,
            )
            self._destroy(*found)

        volumes = [self._require_volume(v) for v in volume_ids]
        backends = sorted({v.backend.id for v in volumes})
        if len(backends) > 1:
            raise errors.InvalidArgument(
                f"the source volumes are on several backends ({', '.join(backends)}): a group snapshot is "
                "taken on one backend"
            )
        backend = volumes[0].backend
        if not loose and not summarize_stats(backend.stats())["consistent_group_snapshot"]:  # stats as of start-up
            raise errors.FailedPrecondition(
                f"backend {backend.id} cannot take consistent group snapshots (its driver does not report "
                "consistent_group_snapshot_enabled); set the parameter consistency: loose in the "
                "VolumeGroupSnapshotClass to accept snapshots taken one after the other"
            )

        group, group_snapshot, members = self._record_new(name, volumes)
        try:
            self._take(backend.driver, group, group_snapshot, members, volumes)
        except Exception:
            try:
                self._destroy(group_snapshot, members)
            except Exception:  # the record stays for the next request of that name to finish the undo
                log.exception("cannot undo the failed group snapshot %s yet", group_snapshot.id)
            raise
        return self._record(group_snapshot, members)

    def _group_type_id(self) -> str:
        """The generic group type's id, made the first time it is needed."""
        if not self._type_made:
            with contextlib.suppress(cinder_exception.GroupTypeExists):
                cinder_db.group_type_create(
                    objects.CONTEXT,
                    {"id": GROUP_TYPE_ID, "name": GROUP_TYPE_NAME, "description": "CSI volume group snapshots"},
                )
            self._type_made = True
        return GROUP_TYPE_ID

    def _record_new(self, name: str, volumes: list[objects.Volume]) -> tuple[Any, Any, list[objects.Snapshot]]:
        """Record the group, its group snapshot and the member snapshots, all ``creating``, in one transaction."""
        type_id = self._group_type_id()
        first = volumes[0]._ovo
        owner = {"user_id": first.user_id, "project_id": first.project_id}
        group_id, group_snapshot_id = str(uuid.uuid4()), str(uuid.uuid4())
        description = f"CSI group snapshot {name}"[:255]
        group_row = models.Group(
            id=group_id,
            name=name,
            description=description,
            status=CREATING,
            group_type_id=type_id,
            host=first.host,
            availability_zone=first.availability_zone,
            **owner,
        )
        type_ids = sorted({v._ovo.volume_type_id for v in volumes})
        mappings = [models.GroupVolumeTypeMapping(volume_type_id=t, group_id=group_id) for t in type_ids]
        group_snapshot_row = models.GroupSnapshot(
            id=group_snapshot_id,
            group_id=group_id,
            name=name,
            description=description,
            status=CREATING,
            group_type_id=type_id,
            **owner,
        )
        members = []
        for volume in volumes:
            member = objects.Snapshot(
                volume, status=CREATING, group_snapshot_id=group_snapshot_id, display_description=description
            )
            member._ovo.created_at = _utcnow()
            members.append(member)
        self._rows.insert_together(members, (group_row, *mappings, group_snapshot_row))
        group = cinder_objects.Group.get_by_id(objects.CONTEXT, group_id)
        return group, cinder_objects.GroupSnapshot.get_by_id(objects.CONTEXT, group_snapshot_id), members

    def _take(
        self, driver: Any, group: Any, group_snapshot: Any, members: list[objects.Snapshot], volumes: list[Any]
    ) -> None:
        """Make the group and its snapshot on the storage, then mark all of it available at once."""
        context = objects.CONTEXT
        try:
            _check(driver.create_group(context, group), "group", group.id)
            # A driver with groups of its own keeps them on the storage: it is told which volumes are in it.
            with contextlib.suppress(NotImplementedError):
                driver.update_group(context, group, add_volumes=[v._ovo for v in volumes])
        except NotImplementedError:
            pass  # cinder's generic group: nothing on the storage
        updates: dict[str, dict[str, Any]]
        try:
            model_update, member_updates = driver.create_group_snapshot(
                context, group_snapshot, [m._ovo for m in members]
            )
            _check(model_update, "group snapshot", group_snapshot.id)
            updates = {u["id"]: {k: v for k, v in u.items() if k != "id"} for u in member_updates or []}
            for member_id, update in updates.items():
                _check(update, "snapshot", member_id)
        except NotImplementedError:  # cinder's generic fallback: one snapshot after the other
            updates = {m.id: driver.create_snapshot(m._ovo) or {} for m in members}
        self._mark_available(group, group_snapshot, members, updates)

    def _mark_available(
        self, group: Any, group_snapshot: Any, members: list[objects.Snapshot], updates: dict[str, dict[str, Any]]
    ) -> None:
        snapshots = models.Snapshot.__table__
        with self._engine.begin() as connection:
            for member in members:
                values = {k: v for k, v in updates.get(member.id, {}).items() if k in snapshots.columns}
                values["status"] = AVAILABLE
                connection.execute(snapshots.update().where(snapshots.c.id == member.id).values(values))
                member._ovo.update(values)
                member._ovo.obj_reset_changes(values.keys())
            for table, row_id in ((_GROUPS, group.id), (_GROUP_SNAPSHOTS, group_snapshot.id)):
                connection.execute(table.update().where(table.c.id == row_id).values(status=AVAILABLE))
        group.status = group_snapshot.status = AVAILABLE
        group.obj_reset_changes(["status"])
        group_snapshot.obj_reset_changes(["status"])

    # --- delete -------------------------------------------------------------------------------------

    def delete(self, group_snapshot_id: str, snapshot_ids: list[str]) -> None:
        found = self._load(group_snapshot_id)
        if found is not None:
            self._record(*found).check_members(snapshot_ids)
            self._destroy(*found)

    def _destroy(self, group_snapshot: Any, members: list[objects.Snapshot]) -> None:
        """Delete the member snapshots from the storage and forget them, then the group snapshot and its
        group. A failure leaves the records of what is left, for the retry."""
        context = objects.CONTEXT
        group = group_snapshot.group
        driver = self._backends.get(_backend_name(group.host)).driver
        try:
            model_update, member_updates = driver.delete_group_snapshot(
                context, group_snapshot, [m._ovo for m in members]
            )
            _check(model_update, "group snapshot", group_snapshot.id)
            for update in member_updates or []:
                _check(update, "snapshot", update.get("id", "?"))
            for member in members:
                self._rows.forget(member)
        except NotImplementedError:  # generic: one snapshot after the other
            for member in members:
                self._destroy_snapshot(member)
        with contextlib.suppress(NotImplementedError):  # no volumes: they are not the group snapshot's to delete
            driver.delete_group(context, group, [])
        with self._engine.begin() as connection:
            connection.execute(_GROUP_SNAPSHOTS.delete().where(_GROUP_SNAPSHOTS.c.id == group_snapshot.id))
            connection.execute(_MAPPINGS.delete().where(_MAPPINGS.c.group_id == group.id))
            connection.execute(_GROUPS.delete().where(_GROUPS.c.id == group.id))


def _check(update: dict[str, Any] | None, what: str, resource_id: str) -> None:
    """Raise when a driver's model update reports an error, as cinder's manager does."""
    status = (update or {}).get("status", "")
    if status in ("error", "error_deleting"):
        raise cinder_exception.VolumeDriverException(message=f"the driver reports {what} {resource_id} as {status}")
