"""cinderlib in a backend worker: its one-time set-up, and the storage backends the worker serves.

A backend that fails to initialise is tried again the next time an operation needs it: the storage may
be back by then.
"""

from __future__ import annotations

import logging
import os

import cinderlib

from mbs_csi import errors, logs
from mbs_csi.controller.persistence import SecretFreePersistence
from mbs_csi.controller.rados_reuse import RadosConnections, reuse_connections
from mbs_csi.controller.records import BackendSpec, WorkerConfig

log = logging.getLogger(__name__)

# Every replica names itself the same, so volume "host" fields do not depend on which one made them.
CINDER_HOST = "mbs-csi"


def setup_cinderlib(config: WorkerConfig) -> None:
    """Set cinderlib up for this process: the database, and cinder's state and lock files under ``state_dir``.

    Cinder's file locks (oslo.concurrency's, and ``cinder.coordination``'s, which cinderlib starts with a
    file backend) live in the state path, which every worker shares: they hold across the workers.
    cinderlib 5.2 loses a ``file_locks_path`` of its own whenever ``state_path`` is given too (it sets
    the lock options on a cached view of the configuration, which setting ``state_path`` discards), so
    both name the one directory the locks are really in.
    """
    state_path = os.path.join(config.state_dir, "cinder")
    os.makedirs(state_path, exist_ok=True)  # and ``state_dir``, where the default SQLite database lives
    cinderlib.setup(
        persistence_config={"storage": SecretFreePersistence, "connection": config.database},
        file_locks_path=state_path,
        state_path=state_path,
        disable_logs=False,
        host=CINDER_HOST,
    )
    logs.setup(config.log_level)  # cinderlib's setup installed oslo.log's handlers, which do not scrub


class Backends:
    """The configured backends, initialised (on first use again, while they fail)."""

    def __init__(self, specs: tuple[BackendSpec, ...]) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._ready: dict[str, cinderlib.Backend] = {}
        self.errors: dict[str, str | None] = {}  # backend name -> why it failed to initialise, or None
        self._connections: dict[str, RadosConnections] = {}
        for spec in specs:
            self._init(spec)

    def _init(self, spec: BackendSpec) -> None:
        try:
            backend = cinderlib.Backend(volume_backend_name=spec.name, volume_driver=spec.volume_driver, **spec.options)
            self._ready[spec.name] = backend
            self.errors[spec.name] = None
            connections = reuse_connections(backend.driver)
            if connections is not None:
                self._connections[spec.name] = connections
        except Exception as exc:
            log.warning("backend %s failed to initialise: %s: %s", spec.name, type(exc).__name__, exc)
            self.errors[spec.name] = f"{type(exc).__name__}: {exc}"

    def get(self, name: str) -> cinderlib.Backend:
        if name not in self._specs:
            raise errors.InvalidArgument(f"unknown backend {name!r}")
        if name not in self._ready:  # failed before: try again, the storage may be back
            self._init(self._specs[name])
        if name not in self._ready:
            raise errors.Unavailable(f"backend {name} is not initialised: {self.errors[name]}")
        return self._ready[name]

    def drop_idle_connections(self) -> None:
        """Shut down the storage connections kept open between calls (see :mod:`rados_reuse`)."""
        for connections in self._connections.values():
            connections.drop_idle()
