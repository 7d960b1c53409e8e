"""The driver's exception hierarchy, plain Python so that every module (the node's standard-library-only
helpers and the backend workers included) can raise from it.

Handlers never build status codes: they raise one of the :class:`CSIError` subclasses below (or let an
unexpected exception escape), and the interceptor's one table (``interceptor.STATUS``) turns it into a
gRPC status. Messages are meant for a person operating the cluster: say what was wrong and what to do.
They are scrubbed of secrets on the way out, and an unexpected exception never reaches the client as a
traceback.
"""

from __future__ import annotations


class MbsCsiError(Exception):
    """Base of every error the driver raises on purpose."""


class ConfigError(MbsCsiError):
    """The configuration is unusable. ``mbs-csi`` exits with code 2 and prints the message."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: key '{key}'" if key else source
        super().__init__(f"{where}: {problem}")


class EndpointError(MbsCsiError):
    """The endpoint cannot be served (bad address, socket held by another live instance...)."""


class CSIError(MbsCsiError):
    """An error answered to a CSI call; its class decides the status code (``interceptor.STATUS``)."""


class InvalidArgument(CSIError):
    pass


class NotFound(CSIError):
    pass


class AlreadyExists(CSIError):
    pass


class OutOfRange(CSIError):
    pass


class FailedPrecondition(CSIError):
    pass


class Aborted(CSIError):
    """Another call for the same volume or name is in flight: the CO retries."""


class ResourceExhausted(CSIError):
    pass


class Unavailable(CSIError):
    """A dependency (database, backend) cannot be reached right now."""


class DeadlineExceeded(CSIError):
    """A backend call took longer than its bound."""


class Internal(CSIError):
    pass


def database_reason(exc: BaseException) -> str:
    """The first line of what a database driver said (SQLAlchemy wraps it as ``orig``), or the type."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
