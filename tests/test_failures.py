"""The backend workers' translation of failures (mbs_csi.controller.failures) for the storage and database
errors the loopback backend and our databases cannot produce on demand: other drivers' size limits, and
the forms oslo.db and SQLAlchemy give a lost or broken database. In a child: it imports cinder."""

from __future__ import annotations

from testkit.child import run_python_json

TRANSLATED = r"""
import errno, json, sqlite3

import sqlalchemy.exc
from cinder import exception as cinder_exception
from oslo_db import exception as db_exception

from mbs_csi.controller import failures


def wrapped(exc):
    try:
        raise cinder_exception.VolumeBackendAPIException(data="cannot grow it") from exc
    except Exception as outer:
        return outer


def sqlalchemy_error(cls, message):
    return cls("SELECT 1", {}, sqlite3.OperationalError(message))


cases = {
    "size limit": cinder_exception.VolumeSizeExceedsLimit(size=9000, limit=100),
    "size quota": cinder_exception.VolumeSizeExceedsAvailableQuota(requested=9000, quota=100, consumed=0),
    "file too large": wrapped(OSError(errno.EFBIG, "File too large")),
    "connection lost": db_exception.DBConnectionError(
        sqlalchemy_error(sqlalchemy.exc.OperationalError, "server closed the connection unexpectedly")
    ),
    "disk I/O error": sqlalchemy_error(sqlalchemy.exc.OperationalError, "disk I/O error"),
    "unopenable": db_exception.DBNonExistentDatabase(
        None, sqlalchemy_error(sqlalchemy.exc.OperationalError, "unable to open database file")
    ),
    "closed": db_exception.DBError(sqlalchemy_error(sqlalchemy.exc.InterfaceError, "connection already closed")),
    "no space": wrapped(OSError(errno.ENOSPC, "No space left on device")),
    "bad data": db_exception.DBDataError(sqlalchemy_error(sqlalchemy.exc.DataError, "value too long")),
}
translated = {name: failures.translate(exc) for name, exc in cases.items()}
print(json.dumps({name: [type(t).__name__, str(t)] if t else None for name, t in translated.items()}))
"""


def test_sizes_the_storage_cannot_hold_and_unusable_databases_are_recognised() -> None:
    found = run_python_json("-c", TRANSLATED)
    for case in ("size limit", "size quota", "file too large"):
        assert found[case][0] == "OutOfRange", case
        assert found[case][1].startswith("the storage cannot hold a volume of the requested size: "), case
    for case, reason in (
        ("connection lost", "server closed the connection unexpectedly"),
        ("disk I/O error", "disk I/O error"),
        ("unopenable", "unable to open database file"),
        ("closed", "connection already closed"),
    ):
        assert found[case][0] == "Unavailable", case
        assert reason in found[case][1], case
    assert found["no space"][0] == "Internal"  # the storage is full: not a size it cannot hold
    assert found["bad data"] is None  # a bug, not an outage: an unexpected failure
