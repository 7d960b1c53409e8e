"""The front's side of the backend workers: start them, hand each call to an idle one, bound every
call with a timeout, and replace a worker that hangs or dies.

A call never waits on a worker that is still starting: it waits for an idle worker, and fails at once
with UNAVAILABLE (and the reason) while no worker could be started at all.

Who touches a worker's socket: only the one thread that holds the worker sends, receives and closes:
the thread starting it, the call running on it, or whoever takes it from the idle list. A worker's
watcher, which learns of its death, retires it and *wakes* its holder: it shuts the socket down, which
ends a receive at once even when a process the worker forked still holds the worker's end, and leaves
the descriptor allocated, so that its number cannot be reused by another worker's socket under the
holder. Each reply also carries its request's number, so an answer is never taken for another call's.

Workers die with the front, however it dies: each asks the kernel for SIGKILL at its parent's death
(``PR_SET_PDEATHSIG``, see :data:`WORKER_BOOT`). The kernel means the parent *thread*, so every worker
is forked by one thread that lives as long as the pool.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mbs_csi import errors
from mbs_csi.controller import wire
from mbs_csi.controller.records import WorkerConfig

log = logging.getLogger(__name__)

RESTART_DELAY = 5.0  # seconds between attempts to start a worker that failed to start

# First, before anything could create a lock (ctypes creates none): ask for SIGKILL (9) when the thread
# that forked this process ends (prctl PR_SET_PDEATHSIG, 1), and exit if the front (argv[2]) is gone
# already, the parent then being another process. Then eventlet patches, before our package is imported.
WORKER_BOOT = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9); os.getppid() == int(sys.argv[2]) or os._exit(1); "
    "import warnings; warnings.filterwarnings('ignore', message=r'\\s*Eventlet is deprecated'); "
    "import eventlet; eventlet.monkey_patch(); "
    "from mbs_csi.controller.worker import main; sys.exit(main())"
)


class WorkerGone(Exception):
    """The worker process died, or answered out of turn."""


class WorkerProcess:
    """A worker process and the front's end of its socket (see the module docstring for who may use it)."""

    def __init__(self, config: WorkerConfig) -> None:
        front, child = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_BOOT, str(child.fileno()), str(os.getpid())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            front.close()
            raise
        finally:
            child.close()
        self._sock = front
        self._guard = threading.Lock()  # orders wake() (any thread) before close() (the holder)
        self._closed = False
        self._call_ids = itertools.count(1)
        self.retired = False  # set once, under the pool's lock, when the pool stops using this worker
        wire.send(front, config)  # a new socket's buffer takes it whole

    def _gone(self, why: str) -> WorkerGone:
        return WorkerGone(f"worker {self.proc.pid} {why} (exit status {self.proc.poll()})")

    def greeting(self, timeout: float) -> wire.Ready | wire.Fatal:
        """What the worker said once started; a :class:`wire.Fatal` of our own when it said nothing."""
        try:
            message = wire.receive(self._sock, time.monotonic() + timeout)
        except TimeoutError:
            return wire.Fatal(f"backend worker {self.proc.pid} did not start within {timeout:.0f}s")
        except (EOFError, OSError):
            return wire.Fatal(f"backend worker {self.proc.pid} exited while starting, with {self.proc.poll()}")
        if not isinstance(message, wire.Ready | wire.Fatal):
            return wire.Fatal(f"backend worker {self.proc.pid} started with {type(message).__name__}")
        return message

    def call(
        self, operation: str, args: tuple[Any, ...], kwargs: dict[str, Any], request_id: str, deadline: float
    ) -> Any:
        """The result of ``operation`` in this worker; raises the error it answered, WorkerGone, or
        TimeoutError once ``deadline`` (``time.monotonic()``) passes."""
        call_id = next(self._call_ids)
        try:
            wire.send(self._sock, wire.Request(call_id, request_id, operation, args, kwargs), deadline)
            reply = wire.receive(self._sock, deadline)
        except TimeoutError:
            raise
        except (EOFError, OSError) as exc:
            raise self._gone(f"died ({type(exc).__name__})") from exc
        if not isinstance(reply, wire.Reply) or reply.call_id != call_id:  # never shown: it may hold secrets
            raise self._gone(f"answered call {call_id} with a {type(reply).__name__} for another")
        if reply.error is not None:
            raise reply.error
        return reply.result

    def wake(self) -> None:
        """End whatever the holder waits for on the socket; any thread may call this."""
        with self._guard:
            if not self._closed:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket and kill the process: for the thread that holds the worker."""
        with self._guard:
            self._closed = True
            self._sock.close()
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
        self._lock = threading.Lock()
        self._idle_added = threading.Condition(self._lock)
        # Last in, first out: under light load the same few workers serve, and stay warm.
        self._idle: list[WorkerProcess] = []
        self._workers: set[WorkerProcess] = set()
        self._ready: set[WorkerProcess] = set()
        self._start_error: str | None = None  # why the last worker failed to start
        self._backend_errors: dict[str, str | None] = {}
        self._closed = False
        self._waiting_for_first = 0  # workers to start once the first one is ready
        self.calls: collections.Counter[str] = collections.Counter()  # round trips made, by operation
        # Forks every worker, and lives as long as the pool: a worker dies when the thread that forked it does.
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix="worker-launch")

    # --- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        # One worker first: it creates or migrates the database schema. Started together, the workers
        # would all migrate at once (SQLite answers "database is locked"); the rest follow once it is up.
        self._waiting_for_first = self.size - 1
        self._spawn_later(0)

    def _spawn_later(self, delay: float) -> None:
        threading.Thread(target=self._spawn, args=(delay,), name="worker-start", daemon=True).start()

    def _spawn(self, delay: float) -> None:
        """Start a worker and hold it until it is ready (then it joins the idle list) or has failed."""
        time.sleep(delay)
        with self._lock:
            if self._closed:
                return
            launched = self._launcher.submit(WorkerProcess, self.config)
        try:
            worker = launched.result()
        except OSError as exc:  # no process could be started (out of memory, of processes)
            self._failed_to_start(f"cannot start a backend worker: {exc}")
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._workers.add(worker)  # from now on, close() wakes this thread to stop it
        if closed:
            worker.close()
            return
        threading.Thread(target=self._watch, args=(worker,), name="worker-watch", daemon=True).start()
        greeting = worker.greeting(self.start_timeout)
        with self._lock:
            started = False
            if isinstance(greeting, wire.Ready) and not worker.retired:  # retired: the pool closed
                started = True
                self._ready.add(worker)
                self._start_error = None
                self._backend_errors = greeting.backend_errors
                followers, self._waiting_for_first = self._waiting_for_first, 0
            else:
                self._retire(worker)
        if not started:
            worker.close()
            if isinstance(greeting, wire.Fatal):
                self._failed_to_start(greeting.message)
            return
        for _ in range(followers):
            self._spawn_later(0)
        log.info("backend worker %d ready", worker.proc.pid)
        self._release(worker)

    def _failed_to_start(self, why: str) -> None:
        with self._lock:
            if self._closed:  # stopped on purpose
                return
            self._start_error = why
        log.error("%s; retrying in %.0fs", why, RESTART_DELAY)
        self._spawn_later(RESTART_DELAY)

    def _watch(self, worker: WorkerProcess) -> None:
        """Replace a ready worker that exits on its own (OOM-killed, crashed), idle or busy, and wake its
        holder; a starting worker's starter replaces it, after RESTART_DELAY."""
        code = worker.proc.wait()
        with self._lock:
            replace = worker in self._ready  # not retired by anyone yet
            held_by_nobody = worker in self._idle
            if replace:
                self._retire(worker)
        if replace:
            log.warning("backend worker %d exited with %s; replaced", worker.proc.pid, code)
            self._spawn_later(0)
        if held_by_nobody:
            worker.close()
        else:
            worker.wake()

    def _retire(self, worker: WorkerProcess) -> bool:
        """Stop using ``worker`` (under ``self._lock``); False when it was retired already."""
        if worker.retired:
            return False
        worker.retired = True
        self._workers.discard(worker)
        self._ready.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        return True

    def _discard(self, worker: WorkerProcess) -> None:
        """For the holder of a worker that failed: retire it, start another unless someone did, close it."""
        with self._lock:
            replace = self._retire(worker) and not self._closed
        worker.close()
        if replace:
            self._spawn_later(0)

    def _release(self, worker: WorkerProcess) -> None:
        """For the holder of a worker that answered: make it idle, or close it if it was retired meanwhile."""
        with self._lock:
            if not worker.retired:
                self._idle.append(worker)
                self._idle_added.notify()
                return
        worker.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            held = [worker for worker in self._workers if worker not in idle]
            for worker in [*idle, *held]:
                self._retire(worker)
            self._idle_added.notify_all()
            self._launcher.shutdown(wait=False)
        for worker in held:  # starting or busy: their holders close them
            worker.wake()
        for worker in idle:
            worker.close()

    # --- health -------------------------------------------------------------------------------------

    def problems(self, required_backend: str | None = None) -> list[str]:
        """Why the controller cannot serve now: no worker up, or ``required_backend`` (the default one)
        failed to initialise. Other backends that failed are in :meth:`backend_errors`: they do not stop
        the healthy ones from serving."""
        with self._lock:
            found = [] if self._ready else [self._start_error or "backend workers are starting"]
            error = self._backend_errors.get(required_backend) if required_backend else None
        if error:
            found.append(f"backend {required_backend} failed to initialise: {error}")
        return found

    def backend_errors(self) -> dict[str, str | None]:
        """Each backend's initialisation error (None when it serves), as the newest worker found it."""
        with self._lock:
            return dict(self._backend_errors)

    # --- calls --------------------------------------------------------------------------------------

    def _acquire(self, deadline: float) -> WorkerProcess:
        with self._lock:
            while not self._idle:
                if self._closed:
                    raise errors.Unavailable("the controller is stopping; retry the request")
                if not self._ready and self._start_error:
                    raise errors.Unavailable(self._start_error)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.Unavailable(f"no backend worker was free for {self.call_timeout:.0f}s; retry")
                self._idle_added.wait(min(1.0, left))  # and look at the start error again
            return self._idle.pop()

    def call(
        self,
        operation: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Any:
        """Run ``operation`` (one of :data:`operations.OPERATIONS`) in a worker and return its result, or
        raise the error it answered.

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
                result = worker.call(operation, args, kwargs or {}, request_id, deadline)
            except TimeoutError:
                self._discard(worker)
                raise errors.DeadlineExceeded(
                    f"backend call {operation} took longer than {timeout:.0f}s; its worker was replaced. "
                    "The operation may still complete on the storage: retry the request"
                ) from None
            except WorkerGone as exc:
                self._discard(worker)
                log.warning(
                    "backend worker died during %s (%s)%s", operation, exc, "; retrying" if attempt == 1 else ""
                )
                if attempt == 2:
                    raise errors.Unavailable(
                        f"backend worker died during {operation} ({exc}); retry the request"
                    ) from None
                continue
            except BaseException:  # the error it answered: the worker is fine
                self._release(worker)
                raise
            self._release(worker)
            return result
        raise AssertionError("unreachable")
