"""A volume's mutable parameters, in a backend worker, kept in Cinder's own model: its volume type.

A volume made with mutable parameters gets a volume type of its own (:func:`give_type`), recorded with the
volume: QoS specs (consumer ``back-end``) and extra specs, split by :func:`mbs_csi.mutable_parameters.split`.
Drivers apply the type when they make the volume (Cinder's RBD driver sets librbd's per-image
``rbd_qos_*`` limits).

cinderlib has no retype, so :func:`modify` does what cinder-volume's ``retype`` does for a driver that
can change a volume in place: it records the new type, asks the driver (``driver.retype`` with the
types' diff), and points the volume (and its snapshots) at the new type once the driver agreed. A driver
that refuses (returns False, or raises its own "invalid" error) leaves the volume as it was: a change it
made before raising is undone by retyping back, and the new type is forgotten. The previous type of the
volume is deleted with the switch, in one transaction.

Killable at any line: the new type is recorded before the driver is asked; a type named after the volume
that the volume does not use (a modify killed before its switch, or before it removed its old type) is
removed by the next modify or the delete of that volume (:func:`forget_stale_types`). A modify killed
after the driver changed the storage, before the switch, is asked of the driver again by the CO's retry.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import sqlalchemy
from cinder import exception as cinder_exception
from cinder import objects as cinder_objects
from cinder.db.sqlalchemy import api as cinder_db
from cinder.db.sqlalchemy import models
from cinder.volume import volume_types
from cinderlib import objects

from mbs_csi import errors, mutable_parameters

log = logging.getLogger(__name__)

# A driver's "this volume cannot be changed so" (cinder-volume falls back to migrating the volume then,
# which mbs-csi does not do). Any other failure is the storage's, and reported as one.
_REFUSED = (cinder_exception.VolumeDriverException, cinder_exception.Invalid)
# Types mbs-csi makes for a volume are named "<volume id>+<type id>" (cinderlib would make one with the
# volume's id and name).
_SEPARATOR = "+"


@contextlib.contextmanager
def one_transaction() -> Iterator[None]:
    """Make the database writes of the block (cinder's and :class:`~rows.Rows`') one transaction."""
    with cinder_db.main_context_manager.writer.using(objects.CONTEXT):
        yield


def give_type(volume: objects.Volume, parameters: Mapping[str, str]) -> None:
    """Record a volume type of its own for the new ``volume``, with ``parameters``, and give it to it.

    Not cinderlib's way (``Volume(qos_specs=..., extra_specs=...)``): cinderlib 5.2's database persistence
    loses the QoS specs on the way (it renames the specs' root row, leaving its keys behind, and does not
    link the type to them), so a driver would find none.
    """
    volume_type = _record_type(volume.id, parameters)
    volume._ovo.volume_type_id = volume_type.id
    volume._ovo.volume_type = volume_type


def current_parameters(volume: objects.Volume) -> dict[str, str]:
    """The mutable parameters the volume's type holds: its extra specs and QoS specs."""
    volume_type = volume._ovo.volume_type
    found = dict(volume_type.extra_specs or {})
    if volume_type.qos_specs_id:
        found.update(volume_type.qos_specs.specs or {})
    return found


def modify(volume: objects.Volume, changes: Mapping[str, str], default_type_id: str) -> bool:
    """Set ``changes`` on the volume (keys it does not name stay as they are); False when it had them."""
    old_type = volume._ovo.volume_type
    forget_stale_types(volume.id, old_type)
    current = current_parameters(volume)
    wanted = {**current, **changes}
    if wanted == current:
        return False
    context = objects.CONTEXT
    new_type = _record_type(volume.id, wanted)
    host = {"host": volume._ovo.host, "cluster_name": None, "capabilities": volume.backend.stats()}
    diff, _ = volume_types.volume_types_diff(context, old_type.id, new_type.id)
    driver = volume.backend.driver
    try:
        result = driver.retype(context, volume._ovo, new_type, diff, host)
    except Exception as exc:
        _undo(volume, new_type, old_type, host)
        _forget_type(new_type.id, new_type.qos_specs_id)
        if isinstance(exc, _REFUSED):
            raise errors.InvalidArgument(_refusal(volume, changes, f": {getattr(exc, 'msg', None) or exc}")) from exc
        raise
    retyped, model_update = result if isinstance(result, tuple) else (result, None)
    if not retyped:
        _forget_type(new_type.id, new_type.qos_specs_id)
        raise errors.InvalidArgument(_refusal(volume, changes, ""))
    _switch(volume, old_type, new_type, dict(model_update or {}), default_type_id)
    log.info("volume %s retyped to %s: %s", volume.id, new_type.id, sorted(changes))
    return True


def _refusal(volume: objects.Volume, changes: Mapping[str, str], reason: str) -> str:
    return (
        f"backend {volume.backend.id} cannot change volume {volume.id} to {dict(sorted(changes.items()))} "
        f"(its driver refused the retype{reason}); the volume is unchanged"
    )


def _record_type(volume_id: str, parameters: Mapping[str, str]) -> Any:
    """Record a new volume type for ``volume_id`` with ``parameters`` (one transaction), and load it."""
    context = objects.CONTEXT
    type_id = str(uuid.uuid4())
    name = f"{volume_id}{_SEPARATOR}{type_id}"
    qos, extra = mutable_parameters.split(parameters)
    with cinder_db.main_context_manager.writer.using(context):
        qos_id = (
            cinder_db.qos_specs_create(context, {"name": name, "consumer": "back-end", "specs": qos})["id"]
            if qos
            else None
        )
        cinder_db.volume_type_create(
            context, {"id": type_id, "name": name, "extra_specs": extra, "is_public": True, "qos_specs_id": qos_id}
        )
    # Not VolumeType.get_by_id: cinderlib 5.2 breaks it (its database hook names a method it lacks).
    volume_type = cinder_objects.VolumeType._from_db_object(
        context, cinder_objects.VolumeType(context), cinder_db.volume_type_get(context, type_id), ["extra_specs"]
    )
    volume_type.qos_specs = cinder_objects.QualityOfServiceSpecs.get_by_id(context, qos_id) if qos_id else None
    volume_type.obj_reset_changes()
    return volume_type


def _undo(volume: objects.Volume, new_type: Any, old_type: Any, host: dict[str, Any]) -> None:
    """Retype back to ``old_type`` after a retype that failed halfway; a failure here is only logged."""
    context = objects.CONTEXT
    try:
        diff, _ = volume_types.volume_types_diff(context, new_type.id, old_type.id)
        volume.backend.driver.retype(context, volume._ovo, old_type, diff, host)
    except Exception:
        log.exception("volume %s: cannot undo a failed retype; its storage may keep part of it", volume.id)


def _switch(
    volume: objects.Volume, old_type: Any, new_type: Any, model_update: dict[str, Any], default_type_id: str
) -> None:
    """Point the volume, its snapshots and the groups of its group snapshots at ``new_type`` and delete
    ``old_type``, in one transaction."""
    values = {"volume_type_id": new_type.id, **model_update}
    with cinder_db.main_context_manager.writer.using(objects.CONTEXT) as session:
        session.query(models.Volume).filter_by(id=volume.id).update(values, synchronize_session=False)
        session.query(models.Snapshot).filter_by(volume_id=volume.id).update(
            {"volume_type_id": new_type.id}, synchronize_session=False
        )
        if old_type.id != default_type_id:  # the volume's own type: the groups it is in (group snapshots) follow
            session.query(models.GroupVolumeTypeMapping).filter_by(volume_type_id=old_type.id).update(
                {"volume_type_id": new_type.id}, synchronize_session=False
            )
            _delete_type_rows(session, old_type.id, old_type.qos_specs_id)
    volume._ovo.update(values)
    volume._ovo.volume_type = new_type
    volume._ovo.obj_reset_changes([*values, "volume_type"])


def forget_stale_types(volume_id: str, kept: Any) -> None:
    """Delete the types made for ``volume_id`` but ``kept`` (its type): what a killed modify left."""
    pattern = f"{volume_id}{_SEPARATOR}%"
    with cinder_db.main_context_manager.writer.using(objects.CONTEXT) as session:
        stale = (
            session.query(models.VolumeType)
            .filter(
                sqlalchemy.or_(models.VolumeType.id == volume_id, models.VolumeType.name.like(pattern)),
                models.VolumeType.id != kept.id,
            )
            .all()
        )
        for volume_type in stale:
            log.info("removing volume type %s, left by an interrupted modify of volume %s", volume_type.id, volume_id)
            _delete_type_rows(session, volume_type.id, volume_type.qos_specs_id)


def _forget_type(type_id: str, qos_specs_id: str | None) -> None:
    with cinder_db.main_context_manager.writer.using(objects.CONTEXT) as session:
        _delete_type_rows(session, type_id, qos_specs_id)


def _delete_type_rows(session: Any, type_id: str, qos_specs_id: str | None) -> None:
    session.query(models.VolumeTypeExtraSpecs).filter_by(volume_type_id=type_id).delete(synchronize_session=False)
    session.query(models.VolumeType).filter_by(id=type_id).delete(synchronize_session=False)
    if qos_specs_id:
        qos = models.QualityOfServiceSpecs
        session.query(qos).filter(sqlalchemy.or_(qos.id == qos_specs_id, qos.specs_id == qos_specs_id)).delete(
            synchronize_session=False
        )
