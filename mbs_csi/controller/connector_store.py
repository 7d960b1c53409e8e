"""Where ControllerPublishVolume finds a node's os-brick connector properties (``connector_store``).

- ``database``: a key/value row per node in the controller's cinderlib database, written and read by a
  backend worker: the publish operation reads the node's row itself, within its one round trip. Only
  role ``all`` publishes there (its node side shares the process with the pool); a node elsewhere would
  need the database's credentials.
- ``kubernetes``: the annotation ``<driver_name>/connector`` of the node's own Node object
  (:mod:`mbs_csi.node_annotations`), read in the front, which hands the properties to the worker.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from mbs_csi import errors
from mbs_csi.config import Settings
from mbs_csi.controller.operations import BackendOperations
from mbs_csi.controller.records import DATABASE_STORE, NodeConnector
from mbs_csi.node_annotations import NodeAnnotations, annotation_key

log = logging.getLogger(__name__)


class ConnectorStore(Protocol):
    def connector(self, node_id: str) -> NodeConnector:
        """Where the publish operation finds ``node_id``'s properties."""


class DatabaseConnectorStore:
    def __init__(self, backend: BackendOperations) -> None:
        self.backend = backend

    def publish(self, node_id: str, properties: dict[str, Any]) -> None:
        self.backend.set_connector(node_id, properties)

    def connector(self, node_id: str) -> NodeConnector:
        return NodeConnector(DATABASE_STORE)


class KubernetesConnectorStore:
    def __init__(self, annotations: NodeAnnotations) -> None:
        self.annotations = annotations

    def connector(self, node_id: str) -> NodeConnector:
        return NodeConnector("kubernetes", self.annotations.lookup(node_id))


def connector_store(
    settings: Settings, backend: BackendOperations
) -> DatabaseConnectorStore | KubernetesConnectorStore:
    """The configured store, for the controller's lookups."""
    if settings.connector_store == DATABASE_STORE:
        return DatabaseConnectorStore(backend)
    return KubernetesConnectorStore(NodeAnnotations(annotation_key(settings.driver_name), settings.kubeconfig))


def gone_or_present(store: ConnectorStore, node_id: str) -> NodeConnector | None:
    """For an unpublish: where ``node_id``'s properties are (no properties: the node is gone), or None
    when the store cannot be asked right now; the unpublish then goes ahead without force."""
    try:
        return store.connector(node_id)
    except errors.CSIError as exc:
        log.warning("cannot tell whether node %s still exists: %s", node_id, exc)
        return None
