"""Connector properties as a JSON annotation ``<driver_name>/connector`` on a Kubernetes Node object.

Both sides of the ``kubernetes`` connector store use it: a node publishes its own os-brick connector
properties there (its service account may only get and patch Node objects, and it holds no database
credentials), and ControllerPublishVolume reads them back. The kubernetes client is imported on first
use: it is heavy (about 0.5 s and 55 MiB here), so the node plugin calls :meth:`publish` from a child
process (``mbs_csi.node.connector_publisher``) and never imports it itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mbs_csi import errors

API_TIMEOUT = 10.0  # seconds for one Kubernetes API request


def annotation_key(driver_name: str) -> str:
    return f"{driver_name}/connector"


class NodeAnnotations:
    """Read and write the connector annotation of the Node object called ``node_id``."""

    def __init__(self, key: str, kubeconfig: Path | None) -> None:
        self.key = key
        self.kubeconfig = kubeconfig  # None: the in-cluster service account
        self._core: Any = None

    def _api(self) -> Any:
        if self._core is None:
            from kubernetes import client, config

            configuration = client.Configuration()
            try:
                if self.kubeconfig:
                    config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)
                else:
                    config.load_incluster_config(client_configuration=configuration)
            except Exception as exc:  # ConfigException, or an unreadable/invalid kubeconfig
                where = f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "the in-cluster service account"
                raise errors.Unavailable(f"cannot load the Kubernetes API configuration from {where}: {exc}") from None
            configuration.retries = 1  # a dead API server answers UNAVAILABLE promptly; the CO retries
            self._core = client.CoreV1Api(client.ApiClient(configuration))
        return self._core

    def _call(self, what: str, node_id: str, method: str, *args: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return getattr(self._api(), method)(node_id, *args, _request_timeout=API_TIMEOUT, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise errors.Unavailable(
                f"the Kubernetes API refused to {what} Node {node_id}: {exc.status} {exc.reason}"
            ) from None
        except errors.CSIError:
            raise
        except Exception as exc:  # urllib3's connection and timeout errors
            raise errors.Unavailable(
                f"cannot reach the Kubernetes API to {what} Node {node_id}: {type(exc).__name__}"
            ) from None

    def publish(self, node_id: str, properties: dict[str, Any]) -> None:
        patch = {"metadata": {"annotations": {self.key: json.dumps(properties, sort_keys=True)}}}
        if self._call("patch", node_id, "patch_node", patch) is None:
            raise errors.NotFound(f"there is no Node {node_id} to annotate; is node_id the Kubernetes node name?")

    def lookup(self, node_id: str) -> dict[str, Any] | None:
        response = self._call("read", node_id, "read_node")
        if response is None:
            return None
        annotations = json.loads(response.data).get("metadata", {}).get("annotations") or {}
        if self.key not in annotations:
            return None
        try:
            properties = json.loads(annotations[self.key])
        except ValueError:
            properties = None
        if not isinstance(properties, dict):
            raise errors.FailedPrecondition(
                f"annotation {self.key} of Node {node_id} is not a JSON object; restart the mbs-csi node plugin "
                "there to publish it again"
            )
        return properties
