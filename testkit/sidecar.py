"""Controller calls made as the kubernetes-csi sidecars make them: the same request again, with backoff,
until it answers OK or a final error, every attempt timed and kept for an audit.

The sidecars treat ABORTED (an operation on that volume is in progress), UNAVAILABLE (the driver is
restarting, or a backend worker died) and DEADLINE_EXCEEDED (their own timeout, or the driver's backend
timeout) as "try again later"; any other error is the answer. A request that keeps answering "later"
past ``give_up`` seconds is given up here, where a sidecar would go on forever: that is a volume left
locked, or a driver that never came back.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from csi import csi_pb2_grpc
from testkit.driver import FAST_RECONNECT
from testkit.wait import WaitTimeout

RETRIED = frozenset({grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
FIRST_DELAY = 0.1  # seconds before the first retry; doubled on each retry up to MAX_DELAY, with jitter
MAX_DELAY = 2.0


@dataclass(frozen=True)
class Attempt:
    """One call as the client saw it."""

    method: str
    about: str  # what the request names: a volume or snapshot name or id
    code: grpc.StatusCode
    details: str
    seconds: float  # from sending the request to its answer

    def __str__(self) -> str:
        answer = self.code.name + (f" ({self.details})" if self.details else "")
        return f"{self.method}({self.about}) -> {answer} after {self.seconds:.1f}s"


class Unanswered(Exception):
    """A request that did not answer OK: a final error, or "later" until the client gave up."""

    def __init__(self, last: Attempt, gave_up: bool) -> None:
        super().__init__(f"{'gave up after' if gave_up else 'final error:'} {last}")
        self.last = last
        self.gave_up = gave_up


class Attempts:
    """Every attempt of every client, in the order they ended (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all: list[Attempt] = []

    def add(self, attempt: Attempt) -> None:
        with self._lock:
            self._all.append(attempt)

    def all(self) -> list[Attempt]:
        with self._lock:
            return list(self._all)


class Shut(Exception):
    """The gate is shut for good: the test is over."""


class Gate:
    """What every call passes: a test holds new calls back to find every backend worker idle in the
    middle of a storm (each answered call has given its worker back), or shuts it when it ends early."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._held = False
        self._shut = False
        self._in_flight = 0

    def shut(self) -> None:
        """Refuse every call from now on (:class:`Shut`)."""
        with self._changed:
            self._shut = True
            self._changed.notify_all()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Around one call: it waits while calls are held back."""
        with self._changed:
            self._changed.wait_for(lambda: self._shut or not self._held)
            if self._shut:
                raise Shut
            self._in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def quiet(self, timeout: float) -> Iterator[None]:
        """No call in flight, and none sent, until the block ends."""
        with self._changed:
            self._held = True
            quiet = self._changed.wait_for(lambda: self._in_flight == 0, timeout)
        try:
            if not quiet:
                raise WaitTimeout(f"calls still in flight after {timeout:g}s")
            yield
        finally:
            with self._changed:
                self._held = False
                self._changed.notify_all()


class Sidecar:
    """One client (one thread) of the controller on ``channel``; ``seed`` fixes its backoff jitter."""

    def __init__(
        self, channel: grpc.Channel, attempts: Attempts, gate: Gate, call_timeout: float, give_up: float, seed: int
    ) -> None:
        self.stub = csi_pb2_grpc.ControllerStub(channel)
        self.attempts = attempts
        self.gate = gate
        self.call_timeout = call_timeout
        self.give_up = give_up
        self._random = random.Random(seed)

    def call(self, method: str, request: Any, about: str) -> Any:
        """The answer of ``method`` to ``request``, retried while it answers "later"; raises
        :class:`Unanswered` on a final error or once retrying exceeded ``give_up`` seconds."""
        rpc = getattr(self.stub, method)
        started = time.monotonic()
        delay = FIRST_DELAY
        while True:
            try:
                with self.gate.call():
                    sent = time.monotonic()
                    answer = rpc(request, timeout=self.call_timeout)
            except grpc.RpcError as exc:
                attempt = Attempt(method, about, exc.code(), exc.details() or "", time.monotonic() - sent)
                self.attempts.add(attempt)
                if attempt.code not in RETRIED:
                    raise Unanswered(attempt, gave_up=False) from None
                if time.monotonic() - started > self.give_up:
                    raise Unanswered(attempt, gave_up=True) from None
                time.sleep(delay * self._random.uniform(0.8, 1.2))
                delay = min(2 * delay, MAX_DELAY)
                continue
            self.attempts.add(Attempt(method, about, grpc.StatusCode.OK, "", time.monotonic() - sent))
            return answer


def channel_to(target: str) -> grpc.Channel:
    """A channel that reconnects within a second when the driver comes back after a kill. Its connection
    is its own: channels with the same target and options share one by default, and a connection that
    failed while the driver was down fails the calls of every channel sharing it until its backoff ends."""
    return grpc.insecure_channel(target, options=[*FAST_RECONNECT, ("grpc.use_local_subchannel_pool", 1)])
