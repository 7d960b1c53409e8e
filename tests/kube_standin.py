"""A stand-in for the Kubernetes API server, because none can run here: an HTTP server that speaks only
the two Node endpoints mbs-csi uses (GET and PATCH ``/api/v1/nodes/{name}``), checks the bearer token,
and keeps Node objects in memory. Everything on the client side (the kubernetes Python client, its
kubeconfig handling, the HTTP requests) is real."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

TOKEN = "stand-in-token-6f1d"
PATCH_TYPES = ("application/strategic-merge-patch+json", "application/merge-patch+json")


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7386); for annotations a strategic merge patch does the same."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = value
    return target


class KubeApiStandIn:
    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content type)
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _node(self) -> str | None:
                with standin.lock:
                    standin.requests.append((self.command, self.path, self.headers.get("Content-Type", "")))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._reply(401, status_object(401, "Unauthorized"))
                    return None
                prefix = "/api/v1/nodes/"
                name = self.path.split("?")[0].removeprefix(prefix)
                if not self.path.startswith(prefix) or not name or "/" in name:
                    self._reply(404, status_object(404, "NotFound"))
                    return None
                if name not in standin.nodes:
                    self._reply(404, status_object(404, "NotFound", f'nodes "{name}" not found'))
                    return None
                return name

            def do_GET(self) -> None:
                name = self._node()
                if name is not None:
                    with standin.lock:
                        self._reply(200, standin.nodes[name])

            def do_PATCH(self) -> None:
                name = self._node()
                if name is None:
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Type") not in PATCH_TYPES:
                    self._reply(415, status_object(415, "UnsupportedMediaType"))
                    return
                with standin.lock:
                    self._reply(200, merge(standin.nodes[name], json.loads(body)))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_node(self, name: str, annotations: dict[str, str] | None = None) -> None:
        with self.lock:
            self.nodes[name] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "annotations": dict(annotations or {}), "labels": {}},
                "status": {"nodeInfo": {"kubeletVersion": "v1.34.0"}},
            }

    def remove_node(self, name: str) -> None:
        """What ``kubectl delete node`` does to the object (its annotations go with it)."""
        with self.lock:
            del self.nodes[name]

    def annotations(self, name: str) -> dict[str, str]:
        with self.lock:
            return dict(self.nodes[name]["metadata"].get("annotations") or {})

    def kubeconfig(self, path: Path, token: str = TOKEN) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                    "users": [{"name": "node", "user": {"token": token}}],
                    "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "node"}}],
                    "current-context": "standin",
                }
            )
        )
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def status_object(code: int, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }
