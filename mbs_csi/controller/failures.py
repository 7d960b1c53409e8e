"""What a failed backend operation means: whether to run it again, and which of the driver's errors it is.

Every backend operation is idempotent, so one that failed for a passing reason runs again: once on a new
storage connection when the old one was shut down, a few times after a pause when the storage library
said it was busy. Whatever still fails becomes one of the driver's errors (:mod:`mbs_csi.errors`), or
surfaces as an unexpected failure.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from cinder import exception as cinder_exception

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


def connection_lost(exc: BaseException | None) -> bool:
    """True when ``exc`` or an exception behind it says the storage connection was shut down (ESHUTDOWN:
    a blocklisted Ceph client, for one); a new connection may well succeed."""
    for _ in range(10):  # a chain can loop back on itself
        if exc is None:
            return False
        if getattr(exc, "errno", None) == errno.ESHUTDOWN:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def translate(exc: Exception) -> errors.CSIError | None:
    """Our error for a cinder exception, or None to let it surface as an unexpected failure."""
    message = str(getattr(exc, "msg", None) or exc)
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
