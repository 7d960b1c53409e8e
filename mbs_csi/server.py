"""The gRPC server: endpoint preparation, service registration per role, graceful shutdown."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import stat
import threading
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from csi import csi_pb2_grpc
from mbs_csi import __version__, errors
from mbs_csi.config import Endpoint, Settings
from mbs_csi.errors import EndpointError
from mbs_csi.health import Check, DatabaseReachable, Readiness, StateDirWritable
from mbs_csi.identity import IdentityService
from mbs_csi.interceptor import RpcInterceptor

if TYPE_CHECKING:
    from mbs_csi.controller.audit import PeriodicAudit
    from mbs_csi.controller.pool import WorkerPool
    from mbs_csi.health_http import HealthServer
    from mbs_csi.node.connector_publisher import ConnectorPublisher, Publish

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
IDENTITY_PREFIX = "/csi.v1.Identity/"  # answered while the driver starts
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


def role_checks(settings: Settings) -> list[Check]:
    """What Probe checks for the roles ``settings`` runs."""
    checks: list[Check] = []
    if settings.runs_controller:
        checks.append(DatabaseReachable(settings.database))
    if settings.runs_node:
        checks.append(StateDirWritable(settings.state_dir))
    return checks


class Server:
    """A started gRPC server for one role; :meth:`stop` drains in-flight calls."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._started = threading.Event()  # set once the role's set-up is done
        self.readiness = Readiness([self._starting])
        for check in role_checks(settings):
            self.readiness.add(check)
        self.interceptor = RpcInterceptor(admit=self._admit)
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
            interceptors=[self.interceptor],
            options=[("grpc.so_reuseport", 0)],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(settings, self.readiness), self._grpc)
        self.pool: WorkerPool | None = None
        self._audit: PeriodicAudit | None = None
        self._publish_connector: Publish | None = None
        self._publisher: ConnectorPublisher | None = None
        self._health: HealthServer | None = None
        if settings.runs_controller:
            self._add_controller()
        if settings.runs_node:
            self._add_node()

    def _add_controller(self) -> None:
        # Imported only for the controller role: a node never loads the controller's front.
        from mbs_csi.controller.client import BackendClient
        from mbs_csi.controller.connector_store import DatabaseConnectorStore, connector_store
        from mbs_csi.controller.group_service import GroupControllerService
        from mbs_csi.controller.pool import WorkerPool
        from mbs_csi.controller.service import ControllerService
        from mbs_csi.controller.worker_config import worker_config

        settings = self.settings
        pool = WorkerPool(worker_config(settings), settings.backend_workers, settings.backend_timeout)
        self.pool = pool
        self.readiness.add(lambda: "; ".join(pool.problems(settings.default_backend)))
        backend = BackendClient(pool)
        store = connector_store(settings, backend)
        if isinstance(store, DatabaseConnectorStore):
            self._publish_connector = store.publish  # role all: this process's node side publishes here
        controller = ControllerService(settings, backend, store)
        csi_pb2_grpc.add_ControllerServicer_to_server(controller, self._grpc)
        csi_pb2_grpc.add_GroupControllerServicer_to_server(GroupControllerService(controller), self._grpc)
        if settings.audit_interval > 0:
            from mbs_csi.controller.audit import PeriodicAudit

            self._audit = PeriodicAudit(settings, store)

    def _add_node(self) -> None:
        from mbs_csi.node.service import NodeService
        from mbs_csi.node.store import FILENAME, AttachmentStore

        store = AttachmentStore(self.settings.state_dir / FILENAME)
        csi_pb2_grpc.add_NodeServicer_to_server(NodeService(self.settings, store), self._grpc)

    def start(self) -> None:
        """Listen and answer at once, then set the role up.

        The kubernetes-csi sidecars give a new connection 1 s and exit when it does not answer: Identity
        (GetPluginInfo, and Probe saying not ready) answers from the moment the socket exists, while the
        backend workers start and the node sets os-brick up; other calls answer UNAVAILABLE until then.
        """
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

            backend_errors = self.pool.backend_errors if self.pool is not None else None
            audit = self._audit
            audit_counts = (lambda: audit.counts) if audit is not None else None
            self.interceptor.observe = serve_metrics(
                self.settings.metrics_endpoint, self._ready, backend_errors, audit_counts
            )
        if self.settings.health_endpoint:
            from mbs_csi.health_http import HealthServer

            self._health = HealthServer(self.settings.health_endpoint, endpoint.grpc_target, self.readiness.problems)
        self._grpc.start()
        log.info("mbs-csi %s serving role=%s on %s", __version__, self.settings.role, endpoint)
        if self._health is not None:
            self._health.start()
        try:
            if self.pool is not None:
                self.pool.start()
            if self._audit is not None:
                self._audit.start()
            if self.settings.runs_node:
                self._start_node()
        except BaseException:
            self._grpc.stop(0)
            raise
        self._started.set()

    def _starting(self) -> str | None:
        return None if self._started.is_set() else "the driver is starting"

    def _admit(self, method: str) -> None:
        if not self._started.is_set() and not method.startswith(IDENTITY_PREFIX):
            raise errors.Unavailable(f"mbs-csi is starting (role {self.settings.role}); retry in a moment")

    def _ready(self) -> bool:
        return not self.readiness.problems()

    def _start_node(self) -> None:
        """Set up os-brick's privileged calls and publish this node's connector properties."""
        from mbs_csi.node import brick
        from mbs_csi.node.connector_publisher import ConnectorPublisher, publish_in_child
        from mbs_csi.node_annotations import NodeAnnotations, annotation_key

        settings = self.settings
        # On the host path, so an old and a new plugin overlapping during an upgrade share os-brick's locks.
        brick.setup_privileges(lock_path=str(settings.state_dir / "os-brick-locks"))
        properties = brick.connector_properties(settings.node_id)
        publish = self._publish_connector
        if settings.connector_store == "kubernetes":
            annotations = NodeAnnotations(annotation_key(settings.driver_name), settings.kubeconfig)
            publish = functools.partial(publish_in_child, annotations)
        if publish is None:
            log.warning(
                "role node with connector_store database cannot publish this node's connector properties (the "
                "database's credentials do not belong on nodes): ControllerPublishVolume will not find node %s; "
                "set connector_store: kubernetes",
                settings.node_id,
            )
            return
        self._publisher = ConnectorPublisher(publish, settings.node_id, properties)
        self._publisher.start()

    def _bind(self, endpoint: Endpoint) -> None:
        try:
            port = self._grpc.add_insecure_port(endpoint.grpc_target)
        except RuntimeError as exc:
            raise EndpointError(f"cannot listen on {endpoint}: {exc}") from None
        if port == 0:
            raise EndpointError(f"cannot listen on {endpoint}: address in use or not available")

    def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish for up to ``grace`` seconds, then close."""
        if self._publisher is not None:
            self._publisher.stop()
        self._grpc.stop(grace).wait()
        if self._audit is not None:
            self._audit.stop()
        if self._health is not None:
            self._health.stop()
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
