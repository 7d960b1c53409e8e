"""Keep a backend worker's RADOS connections open between calls, for Cinder's RBD drivers.

Cinder's RBD driver opens a new cluster connection for every operation and shuts it down after: a new
librados client with its threads, cephx authentication with the monitor, the monitor and OSD maps. On
this project's test cluster that costs about 6.5 ms of CPU in the client alone (plus the monitor's
share), and a CreateVolume and DeleteVolume open several. Under a storm of calls it is the largest cost
of the controller. A backend worker makes one call at a time and lives for many, so it hands a released
connection to the next operation instead of shutting it down.

What a reused connection could carry over from a failed call is dropped: a connection released while an
exception is on its way is shut down, every idle connection is shut down when a backend operation fails
(the client may have been blocklisted, or the pool recreated), and one idle for longer than ``max_idle``
seconds is shut down instead of reused. A blocklisted client fails at once with ESHUTDOWN; the adapter
then runs the operation once more, on a new connection. At most ``keep`` connections
per (pool, cluster, timeout) stay open; nested operations open more and shut the extras down.

The driver is patched per instance through its two connection methods, ``_connect_to_rados`` and
``_disconnect_from_rados``, which every RBD operation in Cinder goes through (``RADOSClient``,
``RBDVolumeProxy``). A driver without them is left alone.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[Any, ...]


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


class RadosConnections:
    """Idle (client, ioctx) pairs of one driver, handed out again by :meth:`connect`."""

    def __init__(self, driver: Any, *, keep: int = 2, max_idle: float = 30.0) -> None:
        self._open: Callable[..., tuple[Any, Any]] = driver._connect_to_rados
        self._close: Callable[[Any, Any], None] = driver._disconnect_from_rados
        self.keep = keep
        self.max_idle = max_idle
        self._idle: dict[Key, list[tuple[Any, Any, float]]] = {}
        self._keys: dict[int, Key] = {}  # id(client) -> key, for the connections handed out
        self.opened = 0  # new connections made (the tests read it)

    def connect(
        self, pool: str | None = None, remote: dict | None = None, timeout: int | None = None
    ) -> tuple[Any, Any]:
        key = (pool, _freeze(remote), timeout)
        idle = self._idle.get(key, [])
        now = time.monotonic()
        while idle:
            client, ioctx, since = idle.pop()
            if now - since <= self.max_idle and client.state == "connected":
                self._keys[id(client)] = key
                return client, ioctx
            self._shutdown(client, ioctx)
        client, ioctx = self._open(pool, remote, timeout)
        self.opened += 1
        self._keys[id(client)] = key
        return client, ioctx

    def disconnect(self, client: Any, ioctx: Any) -> None:
        key = self._keys.pop(id(client), None)
        idle = self._idle.setdefault(key, []) if key is not None else None
        # Released while an exception is on its way (the driver's ``with`` block or its except clause):
        # whatever went wrong may have been the connection itself, so it is not kept.
        failing = sys.exc_info()[1] is not None
        if idle is None or failing or len(idle) >= self.keep:
            self._shutdown(client, ioctx)
            return
        idle.append((client, ioctx, time.monotonic()))

    def drop_idle(self) -> None:
        """Shut every idle connection down: after a failed operation, and when the worker stops."""
        idle, self._idle = self._idle, {}
        for pairs in idle.values():
            for client, ioctx, _ in pairs:
                self._shutdown(client, ioctx)

    def _shutdown(self, client: Any, ioctx: Any) -> None:
        try:
            self._close(client, ioctx)
        except Exception as exc:  # a connection that cannot even close is gone anyway
            log.debug("closing a RADOS connection failed: %s", exc)


def reuse_connections(driver: Any) -> RadosConnections | None:
    """Make ``driver`` reuse its RADOS connections; None when it is not an RBD-style driver."""
    if not (
        callable(getattr(driver, "_connect_to_rados", None))
        and callable(getattr(driver, "_disconnect_from_rados", None))
    ):
        return None
    connections = RadosConnections(driver)
    driver._connect_to_rados = connections.connect
    driver._disconnect_from_rados = connections.disconnect
    return connections
