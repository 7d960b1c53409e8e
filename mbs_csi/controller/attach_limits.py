"""The attach limit, in the worker that publishes: count the node's publications in the database and
refuse one more (RESOURCE_EXHAUSTED), in the same round trip as the publish itself.

Two publishes to one node may run at once in two workers (or two replicas): each would count, find room,
and both connect, one past the limit. So the count and the connect run under a lock of the node: on
PostgreSQL an advisory lock, which every replica sees and whose wait is bounded by the worker's
``lock_timeout``; on SQLite (one host) a lock of cinder's coordinator, a file in cinder's lock directory
shared by every worker. Publishes to other nodes, and every publish while no limit is set, take no lock.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy
from cinder import coordination

from mbs_csi import errors
from mbs_csi.controller.records import AttachLimits
from mbs_csi.inflight import lock_id

# A publish waits this long for another publish to the same node (SQLite; PostgreSQL: its lock_timeout).
LOCK_WAIT_S = 60.0

_PUBLISHED = sqlalchemy.text(
    "SELECT v.host FROM volume_attachment a JOIN volumes v ON v.id = a.volume_id "
    "WHERE a.attached_host = :node AND a.deleted = :deleted AND v.deleted = :deleted"
)


def backend_of(host: str) -> str:
    """The backend of a volume from its ``host`` column ("host@backend#pool", as cinderlib writes it)."""
    return host.split("@")[-1].split("#")[0]


class NodeSlots:
    def __init__(self, engine: sqlalchemy.engine.Engine) -> None:
        self._engine = engine

    def published(self, node_id: str) -> Counter[str]:
        """How many volumes of each backend are published to ``node_id``."""
        with self._engine.connect() as connection:
            hosts = connection.execute(_PUBLISHED, {"node": node_id, "deleted": False}).scalars().all()
        return Counter(backend_of(h) for h in hosts)

    @contextmanager
    def reserve(self, node_id: str, backend: str, limits: AttachLimits) -> Iterator[None]:
        """Room for one more volume of ``backend`` on ``node_id``, held until the block ends (the publish
        records its connection inside it); ResourceExhausted when the node is full."""
        if not limits.limited(backend):
            yield
            return
        with self._node_lock(node_id):
            counts = self.published(node_id)
            total, of_backend = sum(counts.values()), counts[backend]
            backend_limit = limits.per_backend.get(backend, 0)
            if limits.per_node and total >= limits.per_node:
                raise errors.ResourceExhausted(
                    f"node {node_id} already has {total} volume(s) published, its limit (max_volumes_per_node)"
                )
            if backend_limit and of_backend >= backend_limit:
                raise errors.ResourceExhausted(
                    f"node {node_id} already has {of_backend} volume(s) of backend {backend} published, the "
                    f"backend's limit (max_volumes_per_node)"
                )
            yield

    @contextmanager
    def _node_lock(self, node_id: str) -> Iterator[None]:
        key = f"attach-limit:{node_id}"
        if self._engine.dialect.name == "postgresql":
            with self._engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:id)"), {"id": lock_id(key)})
                try:
                    yield
                finally:
                    try:
                        connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:id)"), {"id": lock_id(key)})
                    except Exception:
                        connection.invalidate()  # its session ends, and the lock with it
            return
        name = "mbs-csi-attach-" + hashlib.sha256(node_id.encode()).hexdigest()[:32]
        lock = coordination.COORDINATOR.get_lock(name)
        if not lock.acquire(blocking=LOCK_WAIT_S):
            raise errors.Aborted(f"another publish to node {node_id} is taking long; retry later")
        try:
            yield
        finally:
            lock.release()
