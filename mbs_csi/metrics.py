"""Prometheus metrics, served at ``/metrics`` on ``metrics_endpoint`` when it is set.

prometheus_client is imported only then: it costs about 12 MiB, which the node role (whose RSS budget
is tight) does not pay unless asked to.

- ``mbs_csi_rpc_duration_seconds{method,code}``: a histogram of every CSI call, by method and status;
  its ``_count`` is the number of calls.
- ``mbs_csi_ready``: 1 while Probe answers ready, 0 while a dependency is unhealthy.
- ``mbs_csi_backend_up{backend}`` (controller): 1 for each backend that initialised, 0 for one that did not
  (its error is in the log). Probe needs only the default backend; the others serve or fail on their own.
- ``mbs_csi_audit_findings{kind}`` (controller, ``audit_interval`` > 0): what the last periodic audit
  found, by kind (``controller/audit.py``); no samples until the first audit ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from mbs_csi.errors import EndpointError

log = logging.getLogger(__name__)

# From a health check's 1 ms to a slow storage array's minutes.
_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Observer = Callable[[str, str, float], None]


BackendErrors = Callable[[], dict[str, str | None]]


AuditCounts = Callable[[], dict[str, int] | None]


def serve_metrics(
    endpoint: str,
    ready: Callable[[], bool],
    backend_errors: BackendErrors | None = None,
    audit_counts: AuditCounts | None = None,
) -> Observer:
    """Start the HTTP server on ``host:port`` (an empty host: every address) and return the function the
    interceptor calls after each RPC with (method, status code name, seconds)."""
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily

    registry = prometheus_client.CollectorRegistry()
    durations = prometheus_client.Histogram(
        "mbs_csi_rpc_duration_seconds",
        "Time taken by CSI calls, by method and status code",
        ("method", "code"),
        buckets=_BUCKETS,
        registry=registry,
    )
    prometheus_client.Gauge(
        "mbs_csi_ready", "1 while Probe answers ready, 0 while a dependency is unhealthy", registry=registry
    ).set_function(lambda: 1.0 if ready() else 0.0)
    if backend_errors is not None:
        errors_now = backend_errors

        class BackendUp:
            def collect(self) -> Iterator[Any]:
                family = GaugeMetricFamily(
                    "mbs_csi_backend_up", "1 when the backend initialised, 0 when it failed to", labels=["backend"]
                )
                for name, error in sorted(errors_now().items()):
                    family.add_metric([name], 0.0 if error else 1.0)
                yield family

        registry.register(BackendUp())
    if audit_counts is not None:
        counts_now = audit_counts

        class AuditFindings:
            def collect(self) -> Iterator[Any]:
                family = GaugeMetricFamily(
                    "mbs_csi_audit_findings", "What the last periodic audit found, by kind", labels=["kind"]
                )
                for kind, count in sorted((counts_now() or {}).items()):
                    family.add_metric([kind], float(count))
                yield family

        registry.register(AuditFindings())
    host, _, port = endpoint.rpartition(":")
    try:
        prometheus_client.start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    except OSError as exc:
        raise EndpointError(f"cannot serve metrics on {endpoint}: {exc.strerror or exc}") from None
    log.info("serving Prometheus metrics on http://%s/metrics", endpoint)

    def observe(method: str, code: str, seconds: float) -> None:
        durations.labels(method, code).observe(seconds)

    return observe
