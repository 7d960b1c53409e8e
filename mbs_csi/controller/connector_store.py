"""Where ControllerPublishVolume finds a node's os-brick connector properties (``connector_store``).

- ``database``: a key/value row per node in the controller's cinderlib database, read and written by a
  backend worker. Only role ``all`` publishes there (its node side shares the process with the pool); a
  node elsewhere would need the database's credentials.
- ``kubernetes``: the annotation ``<driver_name>/connector`` of the node's own Node object
  (:mod:`mbs_csi.node_annotations`), read in-process.
"""

from __future__ import annotations

from typing import Any, Protocol

from mbs_csi.config import Settings
from mbs_csi.controller.pool import WorkerPool
from mbs_csi.node_annotations import NodeAnnotations, annotation_key


class ConnectorStore(Protocol):
    def lookup(self, node_id: str) -> dict[str, Any] | None: ...


class DatabaseConnectorStore:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def publish(self, node_id: str, properties: dict[str, Any]) -> None:
        self.pool.call("set_connector", node_id=node_id, properties=properties)

    def lookup(self, node_id: str) -> dict[str, Any] | None:
        return self.pool.call("get_connector", node_id=node_id)


def connector_store(settings: Settings, pool: WorkerPool) -> DatabaseConnectorStore | NodeAnnotations:
    """The configured store, for the controller's lookups."""
    if settings.connector_store == "kubernetes":
        return NodeAnnotations(annotation_key(settings.driver_name), settings.kubeconfig)
    return DatabaseConnectorStore(pool)
