"""The driver's exception hierarchy and the one table that turns an exception into a gRPC status.

Handlers never build status codes: they raise one of the :class:`CSIError` subclasses below (or let an
unexpected exception escape), and the server's interceptor calls :func:`to_status`. Messages are meant
for a person operating the cluster: say what was wrong and what to do. They are scrubbed of secrets on
the way out, and an unexpected exception never reaches the client as a traceback.
"""

from __future__ import annotations

import grpc


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
    """An error answered to a CSI call; its class decides the status code (see ``STATUS``)."""


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


class Unimplemented(CSIError):
    pass


class Internal(CSIError):
    pass


# The one table. Looked up along the exception's MRO, so a subclass inherits its parent's code.
STATUS: dict[type[BaseException], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    Internal: grpc.StatusCode.INTERNAL,
    ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    # The generated servicer base classes raise this for RPCs a service does not implement.
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
}


def database_reason(exc: BaseException) -> str:
    """The first line of what a database driver said (SQLAlchemy wraps it as ``orig``), or the type."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def register(cls: type[BaseException], code: grpc.StatusCode) -> None:
    """Add a row to the table for an exception class of a module that cannot import this one (the node's
    mount helpers use only the standard library); registered where that module is wired in."""
    STATUS[cls] = code


def to_status(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for ``exc``.

    Errors raised on purpose keep their message. Anything else is a bug or an unexpected failure: the
    client gets INTERNAL with the request id to find the full traceback in the driver's log.
    """
    for cls in type(exc).__mro__:
        code = STATUS.get(cls)
        if code is not None:
            return code, str(exc) or cls.__name__
    return (
        grpc.StatusCode.INTERNAL,
        f"unexpected {type(exc).__name__} in the driver; see its log for request id {request_id}",
    )
