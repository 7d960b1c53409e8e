"""One call at a time per volume, snapshot or name: a conflicting call answers ABORTED at once (the CO
retries).

A call that only reads a volume (a snapshot of it, a clone of it) holds it *shared*: several may run
together, and none may run while a call holds it *exclusively* (delete, expand, publish).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from mbs_csi import errors


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exclusive: set[str] = set()
        self._shared: Counter[str] = Counter()

    @contextmanager
    def hold(self, *keys: str, shared: Iterable[str] = ()) -> Iterator[None]:
        """Hold ``keys`` exclusively and ``shared`` shared for the duration, or raise Aborted holding none."""
        exclusive = {k for k in keys if k}
        readers = {k for k in shared if k} - exclusive
        with self._lock:
            busy = sorted((exclusive & (self._exclusive | set(self._shared))) | (readers & self._exclusive))
            if busy:
                raise errors.Aborted(f"an operation on {busy[0]} is already in progress; retry later")
            self._exclusive |= exclusive
            self._shared.update(readers)
        try:
            yield
        finally:
            with self._lock:
                self._exclusive -= exclusive
                self._shared.subtract(readers)
                self._shared += Counter()  # drop keys whose count fell to zero
