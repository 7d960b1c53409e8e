"""A backend worker process: eventlet-patched, cinderlib initialised once, one call at a time.

Started by :class:`mbs_csi.controller.pool.WorkerPool` as ``python -c WORKER_BOOT FD``: the boot line
monkey-patches with eventlet first, then calls :func:`main`. FD is the worker's end of a socketpair.
Protocol (pickled messages, both ends are this project's code):

- front -> worker: a :class:`WorkerConfig`, then requests ``(request_id, operation, kwargs)``;
- worker -> front: ``("ready", {backend: error or None})`` or ``("fatal", message)`` once, then one
  reply per request: ``("ok", result)`` or ``("error", (error class name, message))``.

Cinder drivers expect eventlet (the RBD driver wraps librados in ``eventlet.tpool``), and eventlet does
not mix with gRPC's server: hence a process of its own, and the gRPC front never imports eventlet.
"""

from __future__ import annotations

import logging
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from mbs_csi import errors, logs, secrets

log = logging.getLogger("mbs_csi.worker")


def error_reply(exc: BaseException, operation: str, request_id: str) -> tuple[str, tuple[str, str]]:
    """The reply for an exception: the nearest CSIError class by name, or Internal."""
    for cls in type(exc).__mro__:
        if issubclass(cls, errors.CSIError) and getattr(errors, cls.__name__, None) is cls:
            return "error", (cls.__name__, secrets.scrub(str(exc)))
    log.exception("%s failed unexpectedly", operation)
    message = f"backend call {operation} failed: {type(exc).__name__}; see the driver log for request id {request_id}"
    return "error", ("Internal", message)


def serve(conn: Connection) -> int:
    config = conn.recv()
    secrets.register_all(config.secrets)
    logs.setup(config.log_level)
    try:
        from mbs_csi.controller.adapter import Adapter  # imports cinderlib

        adapter = Adapter(config)
    except Exception as exc:
        log.exception("cannot initialise cinderlib")
        conn.send(("fatal", secrets.scrub(f"cannot initialise cinderlib: {type(exc).__name__}: {exc}")))
        return 1
    conn.send(("ready", adapter.backend_errors))
    while True:
        try:
            request_id, operation, kwargs = conn.recv()
        except EOFError:  # the front closed its end: stop
            adapter.drop_idle_connections()
            return 0
        token = logs.request_id.set(request_id)
        try:
            reply: tuple[str, Any] = ("ok", adapter.run(operation, kwargs))
        except Exception as exc:
            reply = error_reply(exc, operation, request_id)
        finally:
            logs.request_id.reset(token)
        conn.send(reply)


def main() -> int:
    """Entry point; the pool's boot line has already run ``eventlet.monkey_patch()``.

    SIGINT and SIGTERM are ignored: a Ctrl-C in a terminal, or a signal to the whole process group, must
    not kill a worker in the middle of a backend call while the front drains. The front stops a worker
    by closing its socket, and a worker whose front is gone reads EOF and exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return serve(Connection(int(sys.argv[1])))
