"""The gRPC server: endpoint preparation, service registration per role, graceful shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc

from csi import csi_pb2_grpc
from mbs_csi import __version__, secrets
from mbs_csi.config import Endpoint, Settings
from mbs_csi.connectors import KubernetesConnectorStore, publish_in_child, store_for
from mbs_csi.controller.pool import WorkerPool
from mbs_csi.controller.records import BackendSpec, WorkerConfig
from mbs_csi.controller.service import ControllerService
from mbs_csi.errors import EndpointError
from mbs_csi.health import DatabaseReachable, Readiness, StateDirWritable
from mbs_csi.identity import IdentityService
from mbs_csi.interceptor import RpcInterceptor
from mbs_csi.server_files import ATTACHMENTS_FILE

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
CONNECTOR_RETRY = 5.0  # seconds between attempts to publish the node's connector properties
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes, NUL included


def prepare_unix_socket(path: str) -> None:
    """Make ``path`` bindable: create its directory, replace a stale socket, refuse a live one."""
    if len(path.encode()) > _UNIX_PATH_MAX:
        raise EndpointError(f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes; choose a shorter one")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise EndpointError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s left by an earlier run", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise EndpointError(f"cannot tell whether socket {path} is in use: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise EndpointError(f"another process is already serving on {path}; stop it or choose another endpoint")


def readiness_for(settings: Settings) -> Readiness:
    readiness = Readiness()
    if settings.runs_controller:
        readiness.add(DatabaseReachable(settings.database))
    if settings.runs_node:
        readiness.add(StateDirWritable(settings.state_dir))
    return readiness


def worker_config(settings: Settings) -> WorkerConfig:
    """What the controller's backend workers need, secrets revealed for them (and listed for scrubbing)."""
    password = secrets.url_password(settings.database)
    sensitive = [s.reveal() for b in settings.backends for s in b.driver_sensitive_options.values()]
    # Files named by secret-looking options (rbd_keyring_conf, san_private_key): drivers print what they
    # read from them (Cinder's RBD driver logs its connection info, keyring included, at DEBUG).
    for backend in settings.backends:
        for option, value in backend.driver_options.items():
            if secrets.is_secret_name(option) and isinstance(value, str) and os.path.isfile(value):
                sensitive += secrets.file_secrets(value)
    return WorkerConfig(
        database=settings.database,
        state_dir=str(settings.state_dir),
        log_level=settings.log_level,
        backends=tuple(BackendSpec(b.name, b.volume_driver, b.all_options()) for b in settings.backends),
        secrets=tuple(sensitive + ([password] if password else [])),
    )


class Server:
    """A started gRPC server for one role; :meth:`stop` drains in-flight calls."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.readiness = readiness_for(settings)
        self._stopping = threading.Event()
        self.interceptor = RpcInterceptor()
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
            interceptors=[self.interceptor],
            options=[("grpc.so_reuseport", 0)],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(settings, self.readiness), self._grpc)
        self.pool: WorkerPool | None = None
        if settings.runs_controller:
            self.pool = WorkerPool(worker_config(settings), settings.backend_workers, settings.backend_timeout)
            self.readiness.add(lambda: "; ".join(self.pool.problems()) if self.pool else None)
        self.connectors = store_for(settings, self.pool)
        if self.pool is not None:
            assert self.connectors is not None
            csi_pb2_grpc.add_ControllerServicer_to_server(
                ControllerService(settings, self.pool, self.connectors), self._grpc
            )
        if settings.runs_node:
            from mbs_csi.node.service import NodeService
            from mbs_csi.node.store import AttachmentStore

            store = AttachmentStore(settings.state_dir / ATTACHMENTS_FILE)
            csi_pb2_grpc.add_NodeServicer_to_server(NodeService(settings, store), self._grpc)

    def start(self) -> None:
        endpoint = self.settings.endpoint
        if endpoint.scheme == "unix":
            prepare_unix_socket(endpoint.address)
            old_umask = os.umask(0o117)  # the socket is born 0660, never briefly wider
            try:
                self._bind(endpoint)
            finally:
                os.umask(old_umask)
            os.chmod(endpoint.address, SOCKET_MODE)
        else:
            self._bind(endpoint)
        if self.settings.metrics_endpoint:
            from mbs_csi.metrics import serve_metrics

            self.interceptor.observe = serve_metrics(self.settings.metrics_endpoint, self._ready)
        if self.pool is not None:
            self.pool.start()
        if self.settings.runs_node:
            self._start_node()
        self._grpc.start()
        log.info("mbs-csi %s serving role=%s on %s", __version__, self.settings.role, endpoint)

    def _ready(self) -> bool:
        return not self.readiness.problems()

    def _start_node(self) -> None:
        """Set up os-brick's privileged calls and publish this node's connector properties."""
        from mbs_csi.node import brick

        # On the host path, so an old and a new plugin overlapping during an upgrade share os-brick's locks.
        brick.setup_privileges(lock_path=str(self.settings.state_dir / "os-brick-locks"))
        properties = brick.connector_properties(self.settings.node_id)
        if self.connectors is None:
            log.warning(
                "role node with connector_store database cannot publish this node's connector properties (the "
                "database's credentials do not belong on nodes): ControllerPublishVolume will not find node %s; "
                "set connector_store: kubernetes",
                self.settings.node_id,
            )
            return
        threading.Thread(target=self._publish_connector, args=(properties,), name="connector", daemon=True).start()

    def _publish_connector(self, properties: dict[str, object]) -> None:
        """Store the connector properties, retrying until it works (the backend workers or the Kubernetes
        API may not be up yet)."""
        store = self.connectors
        while not self._stopping.is_set():
            try:
                if isinstance(store, KubernetesConnectorStore):
                    publish_in_child(store, self.settings.node_id, properties)
                else:
                    assert store is not None
                    store.publish(self.settings.node_id, properties)
                log.info("published connector properties of node %s", self.settings.node_id)
                return
            except Exception as exc:
                log.warning("cannot publish connector properties yet (%s); retrying", exc)
                self._stopping.wait(CONNECTOR_RETRY)

    def _bind(self, endpoint: Endpoint) -> None:
        try:
            port = self._grpc.add_insecure_port(endpoint.grpc_target)
        except RuntimeError as exc:
            raise EndpointError(f"cannot listen on {endpoint}: {exc}") from None
        if port == 0:
            raise EndpointError(f"cannot listen on {endpoint}: address in use or not available")

    def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish for up to ``grace`` seconds, then close."""
        self._stopping.set()
        self._grpc.stop(grace).wait()
        if self.pool is not None:
            self.pool.close()
        endpoint = self.settings.endpoint
        if endpoint.scheme == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(endpoint.address)


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then drain and return the exit code."""
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info(
            "received %s: draining in-flight calls for up to %.0fs", signal.Signals(signum).name, settings.grace_period
        )
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = Server(settings)
    server.start()
    while not stop_requested.wait(1.0):
        pass
    server.stop(settings.grace_period)
    log.info("stopped")
    return 0
