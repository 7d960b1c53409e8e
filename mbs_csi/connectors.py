"""Where nodes publish their os-brick connector properties and where ControllerPublishVolume finds them.

Two stores, chosen by ``connector_store``:

- ``database``: the controller's cinderlib database (a key/value row per node), through a backend
  worker. Only for role ``all`` or a node allowed to hold the database's credentials.
- ``kubernetes``: an annotation ``<driver_name>/connector`` on the node's own Node object. Nodes hold
  no database credentials; their service account may only get and patch Node objects.

The kubernetes client is heavy to import (about 0.5 s and 55 MiB here), more than the node role's whole
budget allows, so a node publishes from a short-lived child process (``python -m mbs_csi.connectors``)
and the node plugin itself never imports it. The controller reads in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mbs_csi import errors

if TYPE_CHECKING:
    from mbs_csi.config import Settings
    from mbs_csi.controller.pool import WorkerPool

API_TIMEOUT = 10.0  # seconds for one Kubernetes API request
PUBLISH_TIMEOUT = 60.0  # seconds for the whole child process (imports included)


class ConnectorStore(Protocol):
    def publish(self, node_id: str, properties: dict[str, Any]) -> None: ...

    def lookup(self, node_id: str) -> dict[str, Any] | None: ...


class DatabaseConnectorStore:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def publish(self, node_id: str, properties: dict[str, Any]) -> None:
        self.pool.call("set_connector", node_id=node_id, properties=properties)

    def lookup(self, node_id: str) -> dict[str, Any] | None:
        return self.pool.call("get_connector", node_id=node_id)


def annotation_key(driver_name: str) -> str:
    return f"{driver_name}/connector"


class KubernetesConnectorStore:
    """Connector properties as JSON in an annotation of the Node object called ``node_id``."""

    def __init__(self, key: str, kubeconfig: Path | None) -> None:
        self.key = key
        self.kubeconfig = kubeconfig
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


def publish_in_child(store: KubernetesConnectorStore, node_id: str, properties: dict[str, Any]) -> None:
    """``store.publish`` in a child process, so that this process never imports the kubernetes client."""
    job = {
        "key": store.key,
        "kubeconfig": str(store.kubeconfig) if store.kubeconfig else None,
        "node_id": node_id,
        "properties": properties,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mbs_csi.connectors"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=PUBLISH_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise errors.Unavailable(f"publishing the connector properties took over {PUBLISH_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise errors.Unavailable(lines[-1] if lines else f"the publishing process exited with {done.returncode}")


def store_for(settings: Settings, pool: WorkerPool | None) -> ConnectorStore | None:
    """The configured store, or None when this process cannot reach it (role node with the database)."""
    if settings.connector_store == "kubernetes":
        return KubernetesConnectorStore(annotation_key(settings.driver_name), settings.kubeconfig)
    return DatabaseConnectorStore(pool) if pool is not None else None


def _main() -> int:
    job = json.load(sys.stdin)
    store = KubernetesConnectorStore(job["key"], Path(job["kubeconfig"]) if job["kubeconfig"] else None)
    try:
        store.publish(job["node_id"], job["properties"])
    except errors.CSIError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
