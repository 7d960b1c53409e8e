"""Short paths into cinder's tables for the reads and writes made on every create and delete.

cinderlib's persistence loads "the volume with this id" as a whole object graph (metadata, admin
metadata, volume type and its extra specs, attachments: one query with four joins); its create
functions end by reading that graph back, and discard it; a status change is an ORM bulk update that
first evaluates itself against the session; a delete is an ORM bulk delete per table. Each costs more
than the database work it does, and more than a loopback volume takes to make. Here:

- a volume or snapshot is loaded from its own row alone; cinder's objects load the related rows
  lazily, the first time something reads them (all but the volume type, which cinder cannot load
  under cinderlib: untyped volumes get cinderlib's default type, as cinderlib gives them);
- a new volume or snapshot is inserted as cinder inserts it, without the read-back;
- the status written once the storage made it is one UPDATE, when the driver's model update touches
  only plain columns, and so is a new size;
- its rows go in one transaction of DELETEs;
- "which ids have this name" and "what still depends on this volume" are plain SELECTs.

Loading and deleting typed volumes (a volume type of their own: mutable parameters, ``retype.py``) and
soft deletes are left to cinderlib, as is everything else. The schema is the pinned cinder release's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import sqlalchemy
from cinder import objects as cinder_objects
from cinder.db.sqlalchemy import api as cinder_db
from cinder.db.sqlalchemy import models
from cinderlib import objects

_IDS_NAMED = {
    table: sqlalchemy.text(f"SELECT id FROM {table} WHERE display_name = :name AND deleted = :deleted")
    for table in ("volumes", "snapshots")
}
_DEPENDENTS = sqlalchemy.text(
    "SELECT 'snapshot', id FROM snapshots WHERE volume_id = :id AND deleted = :deleted "
    "UNION ALL SELECT 'node', attached_host FROM volume_attachment WHERE volume_id = :id AND deleted = :deleted"
)

Resource: TypeAlias = objects.Volume | objects.Snapshot


@dataclass(frozen=True)
class _Kind:
    model: Any
    ovo_class: Any
    owner_key: str  # the column of the child rows naming their volume or snapshot
    children: dict[str, tuple[str, Any]]  # object field -> (relationship on the model, child model)


_KINDS = {
    objects.Volume: _Kind(
        models.Volume,
        cinder_objects.Volume,
        "volume_id",
        {
            "metadata": ("volume_metadata", models.VolumeMetadata),
            "admin_metadata": ("volume_admin_metadata", models.VolumeAdminMetadata),
        },
    ),
    objects.Snapshot: _Kind(
        models.Snapshot,
        cinder_objects.Snapshot,
        "snapshot_id",
        {"metadata": ("snapshot_metadata", models.SnapshotMetadata)},
    ),
}


class Rows:
    def __init__(self, engine: sqlalchemy.engine.Engine, persistence: Any) -> None:
        self.engine = engine
        self._engine = engine
        self._persistence = persistence  # cinderlib's DBPersistence

    # --- reads --------------------------------------------------------------------------------------

    def ids_named(self, table: str, name: str) -> list[str]:
        """Ids of the volumes or snapshots (``table``) called ``name``."""
        with self._engine.connect() as connection:
            return [row[0] for row in connection.execute(_IDS_NAMED[table], {"name": name, "deleted": False})]

    def dependents(self, volume_id: str) -> tuple[list[str], list[str]]:
        """(ids of the volume's snapshots, nodes it is published to)."""
        with self._engine.connect() as connection:
            rows = connection.execute(_DEPENDENTS, {"id": volume_id, "deleted": False}).all()
        return [v for kind, v in rows if kind == "snapshot"], sorted({v for kind, v in rows if kind == "node"})

    def _load(self, kind: _Kind, row_id: str) -> Any:
        """The cinder object of ``kind``'s row ``row_id`` (not deleted), or None."""
        table = kind.model.__table__
        with self._engine.connect() as connection:
            row = connection.execute(
                table.select().where(table.c.id == row_id, table.c.deleted == sqlalchemy.false())
            ).first()
        if row is None:
            return None
        return kind.ovo_class._from_db_object(objects.CONTEXT, kind.ovo_class(objects.CONTEXT), row._mapping)

    def volume(self, volume_id: str) -> objects.Volume | None:
        ovo = self._load(_KINDS[objects.Volume], volume_id)
        if ovo is None:
            return None
        if ovo.volume_type_id != self._persistence.DEFAULT_TYPE.id:  # a typed volume: cinderlib loads its type
            found = self._persistence.get_volumes(volume_id=volume_id)
            return found[0] if found else None
        # The type must be set: under cinderlib, cinder's lazy load of a volume type fails.
        ovo.volume_type = self._persistence.DEFAULT_TYPE
        ovo.obj_reset_changes(["volume_type"])
        return objects.Volume(ovo.host.split("@")[-1].split("#")[0], __ovo=ovo)  # host is "host@backend#pool"

    def snapshot(self, snapshot_id: str) -> objects.Snapshot | None:
        ovo = self._load(_KINDS[objects.Snapshot], snapshot_id)
        return None if ovo is None else objects.Snapshot(None, __ovo=ovo)

    # --- writes -------------------------------------------------------------------------------------

    def _typed(self, resource: Resource) -> bool:
        return isinstance(resource, objects.Volume) and resource._ovo.volume_type_id not in (
            None,
            self._persistence.DEFAULT_TYPE.id,
        )

    def insert(self, resource: Resource) -> None:
        """Write the rows of a new volume or snapshot, as cinderlib's ``save`` does (a volume's own type, if
        it has one, is recorded beforehand: ``retype.give_type``)."""
        if self._typed(resource) and resource._ovo.volume_type_id == resource.id:  # a type cinderlib makes
            resource.save()
            return
        self.insert_together([resource])

    def insert_together(self, resources: list[Resource], others: tuple[Any, ...] = ()) -> None:
        """Write the rows of new untyped volumes or snapshots and of the cinder models ``others`` (a group
        and its group snapshot), all in one transaction: all recorded, or none."""
        rows = [self._row(resource) for resource in resources]
        with cinder_db.main_context_manager.writer.using(objects.CONTEXT) as session:
            for row in others:  # in order: rows that others refer to come first
                session.add(row)
                session.flush()
            session.add_all(rows)
        for resource in resources:
            self._persistence.reset_change_tracker(resource)

    def _row(self, resource: Resource) -> Any:
        """The model row (with its metadata rows) of a new untyped volume or snapshot."""
        values = self._persistence.get_changed_fields(resource)  # of a new object: every field set
        # cinderlib's type for untyped volumes; a volume typed beforehand (retype.py) keeps its type.
        if isinstance(resource, objects.Volume) and not self._typed(resource):
            resource._ovo.volume_type = self._persistence.DEFAULT_TYPE
            resource._ovo.volume_type_id = values["volume_type_id"] = self._persistence.DEFAULT_TYPE.id
        kind = _KINDS[type(resource)]
        row = kind.model()
        for field, (relationship, child_model) in kind.children.items():
            items = values.pop(field, None) or {}
            setattr(row, relationship, [child_model(key=key, value=value) for key, value in items.items()])
        row.update(values)
        return row

    def mark_available(self, resource: Resource, model_update: dict[str, Any] | None) -> None:
        """Record that the storage made ``resource``: status ``available`` and the driver's model update."""
        self._update(resource, {"status": "available", **(model_update or {})})

    def resize(self, volume: objects.Volume, size_gib: int) -> None:
        """Record that the storage grew ``volume`` to ``size_gib``."""
        self._update(volume, {"size": size_gib})

    def _update(self, resource: Resource, values: dict[str, Any]) -> None:
        """Set ``values`` on ``resource`` and its row: one UPDATE when they are all plain columns."""
        resource._ovo.update(values)
        table = _KINDS[type(resource)].model.__table__
        if not values.keys() <= set(table.columns.keys()):  # metadata or the like: rows of other tables
            resource.save()
            return
        with self._engine.begin() as connection:
            connection.execute(table.update().where(table.c.id == resource.id).values(values))
        resource._ovo.obj_reset_changes(values.keys())

    def forget(self, resource: Resource) -> None:
        """Delete the rows of a volume or snapshot the storage no longer has."""
        if self._persistence.soft_deletes or self._typed(resource):
            if isinstance(resource, objects.Volume):
                self._persistence.delete_volume(resource)
            else:
                self._persistence.delete_snapshot(resource)
            return
        kind = _KINDS[type(resource)]
        with self._engine.begin() as connection:
            for _, child_model in kind.children.values():
                child = child_model.__table__
                connection.execute(child.delete().where(child.c[kind.owner_key] == resource.id))
            table = kind.model.__table__
            connection.execute(table.delete().where(table.c.id == resource.id))
        resource._ovo.status = "deleted"
