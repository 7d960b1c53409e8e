"""What a failed backend operation means: whether to run it again, and which of the driver's errors it is.

Every backend operation is idempotent, so one that failed for a passing reason runs again: once on a new
storage connection when the old one was shut down, a few times after a pause when the storage library
said it was busy. Whatever still fails becomes one of the driver's errors (:mod:`mbs_csi.errors`), or
surfaces as an unexpected failure. Among them: a database that cannot be reached or used is
UNAVAILABLE (the CO retries), a size the storage cannot hold is OUT_OF_RANGE.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import sqlalchemy.exc
from cinder import exception as cinder_exception
from oslo_db import exception as db_exception

from mbs_csi import errors

log = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds to wait before each new attempt of an operation the storage library refused as busy.
BUSY_RETRY_DELAYS = (0.1, 0.3, 1.0, 2.0)


def busy(exc: Exception) -> bool:
    """Whether the storage refused because something else is using the volume or snapshot right now."""
    return isinstance(exc, cinder_exception.VolumeIsBusy | cinder_exception.SnapshotIsBusy) or library_busy(exc)


def library_busy(exc: Exception) -> bool:
    """A storage library's own "busy" that the driver let through without retrying, such as librbd's
    ImageBusy when several clients change one image's snapshots at once (seen at 16 concurrent
    DeleteSnapshot calls on Ceph). Cinder's *IsBusy come after the driver's own retries."""
    return type(exc).__name__ == "ImageBusy"


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it: its cause or context, or what oslo.db wrapped."""
    for _ in range(10):  # a chain can loop back on itself
        if exc is None:
            return
        yield exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__


def connection_lost(exc: BaseException | None) -> bool:
    """True when ``exc`` or an exception behind it says the storage connection was shut down (ESHUTDOWN:
    a blocklisted Ceph client, for one); a new connection may well succeed."""
    return any(getattr(e, "errno", None) == errno.ESHUTDOWN for e in _chain(exc))


# A database that cannot be reached or used right now: oslo.db's connection error, and what the DB-API
# calls an operational or interface error (a lost or refused connection, a lock or statement timeout, a
# locked SQLite file, a disk I/O error), as SQLAlchemy wraps it and oslo.db may wrap that again.
_DATABASE_UNAVAILABLE = (
    db_exception.DBConnectionError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
)

# The storage's own "this size is more than I can hold": a file too large (EFBIG, from the loopback
# driver), or Cinder's size limits, which drivers raise for a volume larger than they support.
_SIZE_REFUSED = (cinder_exception.VolumeSizeExceedsLimit, cinder_exception.VolumeSizeExceedsAvailableQuota)


def database_unavailable(exc: BaseException) -> BaseException | None:
    """The database error behind ``exc`` when it says the database cannot be reached or used now."""
    return next((e for e in _chain(exc) if isinstance(e, _DATABASE_UNAVAILABLE)), None)


def size_refused(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception behind it says the storage cannot hold a volume that large."""
    return any(isinstance(e, _SIZE_REFUSED) or getattr(e, "errno", None) == errno.EFBIG for e in _chain(exc))


def translate(exc: Exception) -> errors.CSIError | None:
    """Our error for a cinder or database exception, or None to let it surface as an unexpected failure."""
    message = str(getattr(exc, "msg", None) or exc)
    database_error = database_unavailable(exc)
    if database_error is not None:
        return errors.Unavailable(
            f"the database cannot be reached or used right now ({errors.database_reason(database_error)}); "
            "try again later"
        )
    if size_refused(exc):
        return errors.OutOfRange(f"the storage cannot hold a volume of the requested size: {message}")
    if busy(exc):
        return errors.Aborted(
            f"the storage reports the volume or snapshot busy ({type(exc).__name__}: {message}); try again later"
        )
    if isinstance(exc, cinder_exception.NotFound):
        return errors.NotFound(message)
    if isinstance(exc, cinder_exception.InvalidInput | cinder_exception.InvalidVolume):
        return errors.FailedPrecondition(message)
    if isinstance(exc, cinder_exception.CinderException):
        return errors.Internal(f"the storage backend refused: {message}")
    return None


def retrying(operation: str, attempt: Callable[[], T], after_failure: Callable[[], None]) -> T:
    """The result of ``attempt()`` (the idempotent backend operation called ``operation``), run again as
    the rules above say; ``after_failure`` runs after every failure that is not already one of ours."""
    busy_delays = iter(BUSY_RETRY_DELAYS)
    reconnected = False
    while True:  # every operation is idempotent: running it again is safe
        try:
            return attempt()
        except errors.CSIError:
            raise
        except Exception as exc:
            after_failure()
            if not reconnected and connection_lost(exc):
                log.info("%s: the storage connection was shut down (%s); trying again on a new one", operation, exc)
                reconnected = True
                continue
            delay = next(busy_delays, None) if library_busy(exc) else None
            if delay is not None:
                log.info("%s: the storage is busy (%s); trying again in %.1f s", operation, exc, delay)
                time.sleep(delay)
                continue
            translated = translate(exc)
            if translated is None:
                raise
            raise translated from exc
