"""HTTP health endpoints for kubelet's probes, on ``health_endpoint``: ``/livez`` and ``/readyz``.

Alive and ready are different questions, and only the first one is worth a restart. ``/readyz`` is
Probe: the driver can serve now (its database answers, its default backend initialised, the role is set
up). A database outage or a broken backend makes it fail, and restarting the driver fixes neither.
``/livez`` asks only whether the driver still answers: it calls GetPluginInfo over the driver's own
gRPC endpoint, which a wedged server or a full thread pool would not answer. The standard library's HTTP
server is enough (a node must stay small).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from csi import csi_pb2, csi_pb2_grpc
from mbs_csi.errors import EndpointError

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 5.0  # seconds the driver's own GetPluginInfo may take before /livez fails


class HealthServer:
    """Serves ``/livez`` and ``/readyz`` on ``endpoint`` (``host:port``) from a daemon thread."""

    def __init__(self, endpoint: str, grpc_target: str, problems: Callable[[], list[str]]) -> None:
        self._grpc_target = grpc_target
        self._problems = problems
        host, _, port = endpoint.rpartition(":")
        try:
            self._http = ThreadingHTTPServer((host or "0.0.0.0", int(port)), self._handler())
        except OSError as exc:
            raise EndpointError(f"cannot serve health checks on {endpoint}: {exc.strerror or exc}") from None
        self._http.daemon_threads = True
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()
        self.endpoint = endpoint

    def start(self) -> None:
        threading.Thread(target=self._http.serve_forever, name="health-http", daemon=True).start()
        log.info("serving health checks on http://%s/livez and /readyz", self.endpoint)

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        if self._channel is not None:
            self._channel.close()

    def alive(self) -> str | None:
        """None when the driver's gRPC server answers GetPluginInfo, else why not."""
        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(self._grpc_target)
            channel = self._channel
        try:
            csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=ANSWER_TIMEOUT)
        except grpc.RpcError as exc:
            return f"the driver's gRPC server does not answer: {exc.code().name}"
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server calls
                if self.path == "/livez":
                    problem = server.alive()
                    self._answer(503 if problem else 200, problem or "ok")
                elif self.path == "/readyz":
                    problems = server._problems()
                    self._answer(503 if problems else 200, "; ".join(problems) or "ok")
                else:
                    self._answer(404, "not found: use /livez or /readyz")

            def _answer(self, code: int, text: str) -> None:
                body = (text + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # kubelet gave up waiting
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # kubelet probes every few seconds
                pass

        return Handler
