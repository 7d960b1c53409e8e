"""The one gRPC server interceptor: request id, a log line in and out, and error-to-status mapping.

Handlers raise; this turns whatever they raise into a status through :data:`STATUS` (the one table from
exception to status code), scrubs secrets from the message, and never lets a traceback reach the client.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message

from csi import csi_pb2
from mbs_csi import errors, logs, secrets

log = logging.getLogger("mbs_csi.rpc")

# The one table. Looked up along the exception's MRO, so a subclass inherits its parent's code.
STATUS: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Internal: grpc.StatusCode.INTERNAL,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    # The generated servicer base classes raise this for RPCs a service does not implement.
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
}


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


# Request fields that identify what a call is about, in the order they are logged.
_ID_FIELDS = ("volume_id", "snapshot_id", "source_volume_id", "name", "node_id", "group_snapshot_id")


def redacted(message: Message) -> Message:
    """A copy of ``message`` whose fields marked ``csi_secret`` (at any depth) show ``***``."""
    copy = type(message)()
    copy.CopyFrom(message)
    _redact(copy)
    return copy


# The field option ``csi_secret`` (csi.proto marks secrets with it); typed loosely by the generated stubs.
_CSI_SECRET: Any = csi_pb2.csi_secret


def _redact(message: Message) -> None:
    for fd, value in message.ListFields():
        if fd.GetOptions().Extensions[_CSI_SECRET]:
            for key in list(value):
                value[key] = secrets.MASK
        elif fd.message_type is None:
            continue
        elif fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is not None:
                for item in value.values():
                    _redact(item)
        elif fd.is_repeated:
            for item in value:
                _redact(item)
        else:
            _redact(value)


def describe_ids(request: Any) -> str:
    """`` volume_id=... name=...`` (leading space) for the identifying fields the request has set."""
    parts = [""]
    for name in _ID_FIELDS:
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class RpcInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        observe: Callable[[str, str, float], None] | None = None,
        admit: Callable[[str], None] | None = None,
    ) -> None:
        self.observe = observe  # metrics: (method, status code name, seconds) after every call
        self.admit = admit  # raises (e.g. Unavailable while starting) to refuse a call, given its full name

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(full_method, handler.unary_unary, stream=False), **serializers
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap(full_method, handler.unary_stream, stream=True), **serializers
            )
        return handler

    def _wrap(self, full_method: str, behavior: Callable[..., Any], stream: bool) -> Callable[..., Any]:
        method = _short(full_method)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            rid = uuid.uuid4().hex[:16]
            token = logs.request_id.set(rid)
            context.set_trailing_metadata((("x-request-id", rid),))
            started = time.monotonic()
            status = grpc.StatusCode.OK
            ids = describe_ids(request)
            log.info("%s called%s", method, ids)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s request: %s", method, text_format.MessageToString(redacted(request), as_one_line=True))
            try:
                try:
                    if self.admit is not None:
                        self.admit(full_method)
                    result = behavior(request, context)
                    return list(result) if stream else result
                except Exception as exc:
                    status, message = to_status(exc, rid)
                    if isinstance(exc, errors.CSIError | NotImplementedError):
                        log.warning("%s failed: %s", method, message)
                    else:
                        log.exception("%s failed unexpectedly", method)
                    context.abort(status, secrets.scrub(message))
            finally:
                seconds = time.monotonic() - started
                log.info("%s done%s status=%s in %.3fs", method, ids, status.name, seconds)
                if self.observe is not None:
                    self.observe(method, status.name, seconds)
                logs.request_id.reset(token)

        return call
