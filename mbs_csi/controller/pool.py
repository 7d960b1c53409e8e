"""The front's side of the backend workers: start them, hand each call to an idle one, bound every
call with a timeout, and replace a worker that hangs or dies.

A call never waits on a worker that is still starting: it waits for an idle worker, and fails at once
with UNAVAILABLE (and the reason) while no worker could be started at all.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from mbs_csi import errors
from mbs_csi.controller.records import WorkerConfig

log = logging.getLogger(__name__)

RESTART_DELAY = 5.0  # seconds between attempts to start a worker that failed to start

# eventlet must patch before anything creates a lock, so it runs first, before our package is imported.
WORKER_BOOT = (
    "import warnings; warnings.filterwarnings('ignore', message=r'\\s*Eventlet is deprecated'); "
    "import eventlet; eventlet.monkey_patch(); "
    "import sys; from mbs_csi.controller.worker import main; sys.exit(main())"
)


class WorkerGone(Exception):
    """The worker process died or stopped answering."""


class WorkerProcess:
    def __init__(self, config: WorkerConfig) -> None:
        parent, child = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_BOOT, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        self.conn.send(config)
        self.retired = False  # set once by the pool when it stops using this worker

    def receive(self, timeout: float) -> Any:
        try:
            answered = self.conn.poll(timeout)
            if answered:
                return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerGone(f"worker {self.proc.pid} exited with {self.proc.poll()}") from exc
        raise TimeoutError  # outside the try: TimeoutError is an OSError

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class WorkerPool:
    def __init__(self, config: WorkerConfig, size: int, call_timeout: float, start_timeout: float = 120.0) -> None:
        self.config = config
        self.size = size
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        # Last in, first out: under light load the same few workers serve, and stay warm.
        self._idle: queue.LifoQueue[WorkerProcess] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._workers: set[WorkerProcess] = set()
        self._ready: set[WorkerProcess] = set()
        self._start_error: str | None = None  # why the last worker failed to start
        self._backend_errors: dict[str, str | None] = {}
        self._closed = False
        self._waiting_for_first = 0  # workers to start once the first one is ready
        self.calls: collections.Counter[str] = collections.Counter()  # round trips made, by operation

    # --- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        # One worker first: it creates or migrates the database schema. Started together, the workers
        # would all migrate at once (SQLite answers "database is locked"); the rest follow once it is up.
        self._waiting_for_first = self.size - 1
        self._spawn_later(0)

    def _spawn_later(self, delay: float) -> None:
        threading.Thread(target=self._spawn, args=(delay,), name="worker-start", daemon=True).start()

    def _spawn(self, delay: float) -> None:
        time.sleep(delay)
        if self._closed:
            return
        worker = WorkerProcess(self.config)
        with self._lock:
            self._workers.add(worker)
        threading.Thread(target=self._watch, args=(worker,), name="worker-watch", daemon=True).start()
        try:
            kind, payload = worker.receive(self.start_timeout)
        except (TimeoutError, WorkerGone) as exc:
            kind, payload = "fatal", f"backend worker did not start ({type(exc).__name__} {exc})"
        if kind != "ready":
            self._retire(worker)
            if self._closed:  # the pool is shutting down: the worker was stopped on purpose
                return
            log.error("%s; retrying in %.0fs", payload, RESTART_DELAY)
            with self._lock:
                self._start_error = payload
            self._spawn_later(RESTART_DELAY)
            return
        with self._lock:
            self._ready.add(worker)
            self._start_error = None
            self._backend_errors = payload
            followers, self._waiting_for_first = self._waiting_for_first, 0
        for _ in range(followers):
            self._spawn_later(0)
        log.info("backend worker %d ready", worker.proc.pid)
        self._idle.put(worker)
        if self._closed:
            self._retire(worker)

    def _watch(self, worker: WorkerProcess) -> None:
        """Replace a worker that exits on its own (OOM-killed, crashed), even while it sits idle."""
        code = worker.proc.wait()
        if not self._closed and self._replace(worker):
            log.warning("backend worker %d exited with %s; replaced", worker.proc.pid, code)

    def _retire(self, worker: WorkerProcess) -> bool:
        """Stop using ``worker`` and kill it; False when it was retired already."""
        with self._lock:
            if worker.retired:
                return False
            worker.retired = True
            self._workers.discard(worker)
            self._ready.discard(worker)
        worker.kill()
        return True

    def _replace(self, worker: WorkerProcess) -> bool:
        """Retire ``worker`` and start another; False when someone else already did."""
        if not self._retire(worker):
            return False
        self._spawn_later(0)
        return True

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            self._retire(worker)

    # --- health -------------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the controller cannot serve now: no worker up, or a backend that failed to initialise."""
        with self._lock:
            found = [] if self._ready else [self._start_error or "backend workers are starting"]
            found += [
                f"backend {name} failed to initialise: {err}" for name, err in self._backend_errors.items() if err
            ]
        return found

    # --- calls --------------------------------------------------------------------------------------

    def _acquire(self, deadline: float) -> WorkerProcess:
        while True:
            with self._lock:
                start_error = None if self._ready else self._start_error
            if start_error:
                raise errors.Unavailable(start_error)
            try:
                worker = self._idle.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise errors.Unavailable(
                        f"no backend worker was free for {self.call_timeout:.0f}s; retry"
                    ) from None
                continue
            if worker.proc.poll() is None and not worker.retired:
                return worker
            self._replace(worker)  # died while idle; usually its watcher got there first

    def call(self, operation: str, request_id: str = "", timeout: float | None = None, **kwargs: Any) -> Any:
        """Run ``operation`` in a worker and return its result, or raise the error it answered.

        A worker that dies under a call is replaced and the call is tried once more on another: every
        operation is idempotent (see adapter.py), and the usual cause is a worker that died while idle,
        just before it was handed the call. A worker that hangs is replaced too, but the call is not
        retried: it may still be running on the storage.
        """
        timeout = timeout or self.call_timeout
        deadline = time.monotonic() + timeout
        for attempt in (1, 2):
            worker = self._acquire(deadline)
            with self._lock:
                self.calls[operation] += 1
            try:
                worker.conn.send((request_id, operation, kwargs))
                kind, payload = worker.receive(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self._replace(worker)
                raise errors.DeadlineExceeded(
                    f"backend call {operation} took longer than {timeout:.0f}s; its worker was replaced. "
                    "The operation may still complete on the storage: retry the request"
                ) from None
            except (WorkerGone, OSError) as exc:
                self._replace(worker)
                log.warning(
                    "backend worker died during %s (%s)%s", operation, exc, "; retrying" if attempt == 1 else ""
                )
                if attempt == 2:
                    raise errors.Unavailable(
                        f"backend worker died during {operation} ({exc}); retry the request"
                    ) from None
                continue
            self._idle.put(worker)
            if kind == "ok":
                return payload
            name, message = payload
            raise getattr(errors, name, errors.Internal)(message)
        raise AssertionError("unreachable")
