"""A child process for tests/test_rows.py: the same volumes and snapshots written and read once through
cinderlib's persistence and once through mbs_csi.controller.rows, on a real database and the loopback
backend. It prints one JSON object with what each side found; the test compares them.

    python -m tests.rows_child DATABASE_URL WORKDIR

cinderlib's setup patches process-global state (eventlet, logging), hence a process of its own.
"""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import json  # noqa: E402 - after monkey-patching, as in the real worker
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import sqlalchemy  # noqa: E402

from mbs_csi import config  # noqa: E402
from mbs_csi.controller.adapter import Adapter  # noqa: E402
from mbs_csi.controller.records import BackendSpec, WorkerConfig  # noqa: E402

# Fields that differ between two objects made one after the other whatever writes them.
PER_OBJECT = {"id", "display_name", "name_id", "_name_id", "created_at", "updated_at", "volume_id"}
METADATA = {"team": "storage", "tier": "gold"}


def fields(resource: Any, skip: set[str] = PER_OBJECT) -> dict[str, Any]:
    """The object's plain fields that are set, as JSON-able values; related objects are left out."""
    from oslo_versionedobjects import fields as ovo_fields

    ovo = resource._ovo
    return {
        name: value if isinstance(value, str | int | float | bool | dict | type(None)) else str(value)
        for name, field in ovo.fields.items()
        if name not in skip and not isinstance(field, ovo_fields.ObjectField) and ovo.obj_attr_is_set(name)
        for value in (getattr(ovo, name),)
    }


def main() -> None:
    database, workdir = sys.argv[1], sys.argv[2]
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # oslo.log writes to stdout
    from cinderlib import objects

    loopback_dir = os.path.join(workdir, "loopback")
    os.makedirs(loopback_dir, exist_ok=True)
    spec = BackendSpec(name="loop", volume_driver=config.LOOPBACK_DRIVER, options={"loopback_dir": loopback_dir})
    adapter = Adapter(
        WorkerConfig(
            database=database,
            state_dir=workdir,
            log_level="WARNING",
            backends=(spec,),
            secrets=(),
            backend_timeout=60.0,
        )
    )
    backend, rows, persistence = adapter.backends.get("loop"), adapter.rows, adapter.persistence
    engine = sqlalchemy.create_engine(database)
    out: dict[str, Any] = {}

    def new_volume(name: str, **extra: Any) -> Any:
        return objects.Volume(backend, size=2, name=name, metadata=dict(METADATA), status="creating", **extra)

    def reload_volume(volume_id: str) -> Any:
        return persistence.get_volumes(volume_id=volume_id)[0]

    def reload_snapshot(snapshot_id: str) -> Any:
        return persistence.get_snapshots(snapshot_id=snapshot_id)[0]

    # A new volume: cinderlib's save against rows.insert, both read back by cinderlib.
    theirs, ours = new_volume("by-cinderlib"), new_volume("by-rows")
    theirs.save()
    rows.insert(ours)
    out["inserted_volume"] = {"cinderlib": fields(reload_volume(theirs.id)), "rows": fields(reload_volume(ours.id))}
    out["inserted_volume_metadata"] = reload_volume(ours.id)._ovo.metadata

    # The same rows loaded by cinderlib and by rows.volume: the related rows load lazily, and match.
    loaded = rows.volume(ours.id)
    assert loaded is not None
    out["loaded_volume"] = {"cinderlib": fields(reload_volume(ours.id), set()), "rows": fields(loaded, set())}
    out["loaded_volume_lazy"] = {
        "metadata": loaded._ovo.metadata,
        "volume_type_id": loaded._ovo.volume_type.id,
        "backend": loaded.backend.id,
    }
    out["missing"] = [rows.volume("00000000-0000-0000-0000-000000000000"), rows.snapshot("nope")]

    # A new snapshot of each volume.
    snap_theirs = objects.Snapshot(reload_volume(theirs.id), name="snap-by-cinderlib", status="creating")
    snap_ours = objects.Snapshot(rows.volume(ours.id), name="snap-by-rows", status="creating")
    snap_theirs.save()
    rows.insert(snap_ours)
    out["inserted_snapshot"] = {
        "cinderlib": fields(reload_snapshot(snap_theirs.id)),
        "rows": fields(reload_snapshot(snap_ours.id)),
    }
    out["loaded_snapshot"] = {
        "cinderlib": fields(reload_snapshot(snap_ours.id), set()),
        "rows": fields(rows.snapshot(snap_ours.id), set()),
    }

    # Status after the storage made it: plain columns in one UPDATE; anything else through cinderlib.
    rows.mark_available(ours, {"provider_location": "loop:ours"})
    rows.mark_available(snap_ours, None)
    rows.mark_available(theirs, {"metadata": {"added": "by-driver"}})
    out["marked"] = {
        "volume": [reload_volume(ours.id).status, reload_volume(ours.id)._ovo.provider_location],
        "volume_updated_at_set": reload_volume(ours.id)._ovo.updated_at is not None,
        "snapshot": reload_snapshot(snap_ours.id).status,
        "metadata_update": [reload_volume(theirs.id).status, reload_volume(theirs.id)._ovo.metadata],
        "changes_left": sorted(ours._ovo.obj_what_changed()),
    }

    # A typed volume goes through cinderlib, which writes (and later deletes) its type's rows.
    typed = new_volume("typed", extra_specs={"thin": "true"})
    rows.insert(typed)
    out["typed"] = {"extra_specs": dict(reload_volume(typed.id).volume_type.extra_specs)}

    # Forgetting: no row of any of them is left, in any table.
    ids = [ours.id, theirs.id, typed.id, snap_ours.id, snap_theirs.id]
    for resource in (snap_ours, snap_theirs, ours, theirs, typed):
        rows.forget(resource)
    left = {}
    with engine.connect() as connection:
        for table, column in (
            ("volumes", "id"),
            ("volume_metadata", "volume_id"),
            ("volume_admin_metadata", "volume_id"),
            ("snapshots", "id"),
            ("snapshot_metadata", "snapshot_id"),
        ):
            query = sqlalchemy.text(f"SELECT count(*) FROM {table} WHERE {column} IN :ids").bindparams(
                sqlalchemy.bindparam("ids", expanding=True)
            )
            left[table] = connection.execute(query, {"ids": ids}).scalar()
        type_query = sqlalchemy.text("SELECT count(*) FROM volume_types WHERE id = :id AND deleted = :deleted")
        left["volume_types"] = connection.execute(type_query, {"id": typed.volume_type_id, "deleted": False}).scalar()
    out["left_after_forget"] = left
    out["found_after_forget"] = [rows.volume(ours.id), persistence.get_volumes(volume_id=ours.id)]
    proto.write(json.dumps(out, default=str) + "\n")
    proto.flush()


if __name__ == "__main__":
    main()
