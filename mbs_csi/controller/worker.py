"""A backend worker process: eventlet-patched, cinderlib initialised once, one call at a time.

Started by :class:`mbs_csi.controller.pool.WorkerPool` as ``python -c WORKER_BOOT FD FRONT_PID``: the
boot line arranges for the worker to die with the front, monkey-patches with eventlet, then calls
:func:`main`. FD is the worker's end of a socketpair, over which it speaks :mod:`wire`: it reads its
:class:`WorkerConfig`, answers :class:`wire.Ready` (or :class:`wire.Fatal`), then one
:class:`wire.Reply` per :class:`wire.Request`, running the operation on the
:class:`~mbs_csi.controller.adapter.Adapter`.

Cinder drivers expect eventlet (the RBD driver wraps librados in ``eventlet.tpool``), and eventlet does
not mix with gRPC's server: hence a process of its own, and the gRPC front never imports eventlet.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

from mbs_csi import errors, logs, secrets
from mbs_csi.controller import wire
from mbs_csi.controller.records import WorkerConfig

log = logging.getLogger("mbs_csi.worker")


def error_for(exc: BaseException, request: wire.Request) -> errors.CSIError:
    """What the front raises for ``exc``: the nearest CSIError class of :mod:`errors`, or Internal."""
    for cls in type(exc).__mro__:
        if issubclass(cls, errors.CSIError) and getattr(errors, cls.__name__, None) is cls:
            return cls(secrets.scrub(str(exc)))
    log.exception("%s failed unexpectedly", request.operation)
    return errors.Internal(
        f"backend call {request.operation} failed: {type(exc).__name__}; see the driver log for request id "
        f"{request.request_id}"
    )


def _send(sock: socket.socket, message: object) -> bool:
    """Send to the front; False when it is gone. The send fails rather than retrying: eventlet's green
    ``os.write`` retries EPIPE forever, and a worker doing so would spin after its front's death."""
    try:
        wire.send(sock, message)
    except OSError:
        return False
    return True


def serve(sock: socket.socket) -> int:
    config: WorkerConfig = wire.receive(sock)
    secrets.register_all(config.secrets)
    logs.setup(config.log_level)
    try:
        from mbs_csi.controller.adapter import Adapter  # imports cinderlib

        adapter = Adapter(config)
    except Exception as exc:
        log.exception("cannot initialise cinderlib")
        _send(sock, wire.Fatal(secrets.scrub(f"cannot initialise cinderlib: {type(exc).__name__}: {exc}")))
        return 1
    front_here = _send(sock, wire.Ready(adapter.backend_errors))
    while front_here:
        try:
            request: wire.Request = wire.receive(sock)
        except (EOFError, OSError):  # the front closed its end, or is gone
            break
        token = logs.request_id.set(request.request_id)
        try:
            reply = wire.Reply(request.call_id, result=adapter.run(request.operation, request.args, request.kwargs))
        except Exception as exc:
            reply = wire.Reply(request.call_id, error=error_for(exc, request))
        finally:
            logs.request_id.reset(token)
        front_here = _send(sock, reply)
    adapter.drop_idle_connections()
    return 0


def main() -> int:
    """Entry point; the pool's boot line has already run ``eventlet.monkey_patch()``.

    SIGINT and SIGTERM are ignored: a Ctrl-C in a terminal, or a signal to the whole process group, must
    not kill a worker in the middle of a backend call while the front drains. The front stops a worker
    by killing it; a worker whose front is gone reads the end of its socket and exits, or is killed by
    the kernel at the front's death (see ``pool.WORKER_BOOT``).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return serve(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=int(sys.argv[1])))
