"""How a node publishes its os-brick connector properties, where ControllerPublishVolume looks for them.

The publishing itself is a callable chosen by the server: in role ``all`` with the ``database`` store, the
controller's store in the same process; with the ``kubernetes`` store, :func:`publish_in_child`, which
patches the node's Node object from a short-lived child process (``python -m
mbs_csi.node.connector_publisher``) so that the node plugin never imports the kubernetes client.
:class:`ConnectorPublisher` retries it in the background until it works, because the backend workers or
the Kubernetes API may not be up yet when the node starts.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mbs_csi import errors
from mbs_csi.node_annotations import NodeAnnotations

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 60.0  # seconds for the whole child process (imports included)
RETRY_INTERVAL = 5.0  # seconds between attempts

Publish = Callable[[str, dict[str, Any]], None]


def publish_in_child(annotations: NodeAnnotations, node_id: str, properties: dict[str, Any]) -> None:
    """``annotations.publish`` in a child process, so that this process never imports the kubernetes client."""
    job = {
        "key": annotations.key,
        "kubeconfig": str(annotations.kubeconfig) if annotations.kubeconfig else None,
        "node_id": node_id,
        "properties": properties,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", __name__],
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


class ConnectorPublisher:
    """Publishes one node's connector properties from a daemon thread, retrying until it works or stops."""

    def __init__(self, publish: Publish, node_id: str, properties: dict[str, Any]) -> None:
        self._publish = publish
        self.node_id = node_id
        self.properties = properties
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._publish(self.node_id, self.properties)
                log.info("published connector properties of node %s", self.node_id)
                return
            except Exception as exc:
                log.warning("cannot publish connector properties yet (%s); retrying", exc)
                self._stopping.wait(RETRY_INTERVAL)


def _main() -> int:
    job = json.load(sys.stdin)
    annotations = NodeAnnotations(job["key"], Path(job["kubeconfig"]) if job["kubeconfig"] else None)
    try:
        annotations.publish(job["node_id"], job["properties"])
    except errors.CSIError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
