"""Waiting for a condition with a deadline: the one polling loop of the harness. Deadlines are generous,
because the suite must pass on a loaded machine; a condition that holds returns at once anyway."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not hold before its deadline."""


def wait_until(condition: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.05) -> T:
    """Call ``condition`` until it returns something true, and return that; after ``timeout`` seconds raise
    :class:`WaitTimeout` saying what was awaited (``what``, or what it returns: e.g. a log read then)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
