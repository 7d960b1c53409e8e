"""One call at a time per volume, snapshot or name: a second one answers ABORTED at once (the CO retries)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from mbs_csi import errors


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Hold every key for the duration, or raise Aborted without holding any."""
        wanted = {k for k in keys if k}
        with self._lock:
            busy = sorted(wanted & self._held)
            if busy:
                raise errors.Aborted(f"an operation on {busy[0]} is already in progress; retry later")
            self._held |= wanted
        try:
            yield
        finally:
            with self._lock:
                self._held -= wanted
