"""The audit, from the front: ``mbs-csi controller audit [--json] [--fix]`` and the controller's periodic
run that feeds the metric ``mbs_csi_audit_findings{kind}``.

The worker compares the storage with the database (``storage_audit.py``); here the publications are
checked against the Kubernetes connector store (the database store is checked by the worker itself), and
``--fix`` hands the provably orphaned findings back to a worker, which checks each again before acting:

- a ``.tmp-*`` leftover of the loopback backend whose lock nobody holds (a live writer holds it);
- a connection to a node whose connector properties are gone: terminated by force and forgotten, as
  ControllerUnpublishVolume does for such a node;
- a record whose delete was asked for (``error_deleting``) and whose storage is gone: the delete finished.

Never fixed: a volume or snapshot on the storage without a record (a pool or array shared with another
deployment, something made by hand, or a database restored from an older backup: nothing proves it is
ours to delete), and the record of a usable volume or snapshot whose storage is gone (a PersistentVolume
may still point at it; an operator decides).

The audit runs in a worker process of its own, started for it, so that it never takes a worker from the
CSI calls; loopback backends start there without removing leftovers, so that they can be reported first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import Counter
from typing import Any

from mbs_csi import config, errors, secrets
from mbs_csi.config import Settings
from mbs_csi.controller.connector_store import ConnectorStore, connector_store, gone_or_present
from mbs_csi.controller.operations import BackendOperations
from mbs_csi.controller.records import CONNECTION_TO_MISSING_NODE, DATABASE_STORE, FINDING_KINDS, Finding
from mbs_csi.controller.storage_audit import missing_node_finding

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AuditResult:
    findings: list[Finding]
    skipped: list[str]
    fixed: list[str] = dataclasses.field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Findings by kind, every kind present (0 when none)."""
        found = Counter(f.kind for f in self.findings)
        return {kind: found[kind] for kind in FINDING_KINDS}

    def as_dict(self) -> dict[str, Any]:
        return {
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "counts": self.counts(),
            "skipped": self.skipped,
            "fixed": self.fixed,
        }


def audit_settings(settings: Settings) -> Settings:
    """The settings of the audit's own worker: loopback backends keep their leftovers at start."""
    backends = tuple(
        dataclasses.replace(b, driver_options={**b.driver_options, "loopback_remove_interrupted_at_start": False})
        if b.volume_driver == config.LOOPBACK_DRIVER
        else b
        for b in settings.backends
    )
    return dataclasses.replace(settings, backends=backends)


def _gone(store: ConnectorStore, node_id: str) -> bool | None:
    """Whether the node's connector properties are gone from the store; None when it cannot tell."""
    connector = gone_or_present(store, node_id)
    return None if connector is None else connector.properties is None


def find(backend: BackendOperations, store: ConnectorStore, store_kind: str) -> AuditResult:
    """One audit: one round trip to the worker, and one connector store lookup per published node."""
    report = backend.audit(store_kind)
    findings = list(report.findings)
    skipped = list(report.skipped)
    gone: dict[str, bool | None] = {}
    for volume_id, node, backend_name in report.publications:
        if node not in gone:
            gone[node] = _gone(store, node)
            if gone[node] is None:
                skipped.append(f"node {node}: the {store_kind} connector store cannot tell whether it still exists")
        if gone[node]:
            findings.append(missing_node_finding(backend_name, volume_id, node, store_kind))
    return AuditResult(findings, skipped)


def fix(backend: BackendOperations, store: ConnectorStore, store_kind: str, found: AuditResult) -> AuditResult:
    """Remove what ``found`` shows provably orphaned, then audit again: what is left."""
    fixable = [
        f
        for f in found.findings
        if f.fixable
        and (f.kind != CONNECTION_TO_MISSING_NODE or store_kind == DATABASE_STORE or _gone(store, f.node_id))
    ]
    fixed = backend.fix_findings(fixable, store_kind) if fixable else []
    after = find(backend, store, store_kind)
    after.fixed = fixed
    return after


def run(settings: Settings, with_fix: bool) -> AuditResult:
    """``mbs-csi controller audit``: in a worker of its own, against the configured connector store."""
    from mbs_csi.controller.client import BackendClient
    from mbs_csi.controller.pool import WorkerPool
    from mbs_csi.controller.worker_config import worker_config

    quiet = dataclasses.replace(audit_settings(settings), log_level="WARNING")
    pool = WorkerPool(worker_config(quiet), size=1, call_timeout=settings.backend_timeout)
    pool.start()
    try:
        client = BackendClient(pool)
        store = connector_store(settings, client)
        found = find(client, store, settings.connector_store)
        return fix(client, store, settings.connector_store, found) if with_fix else found
    finally:
        pool.close()


def render(result: AuditResult, as_json: bool) -> str:
    if as_json:
        return secrets.scrub(json.dumps(result.as_dict(), indent=2))
    lines = [f"fixed: {done}" for done in result.fixed]
    for finding in result.findings:
        lines.append(f"{finding.kind}: backend {finding.backend}: {finding.name}: {finding.detail}")
    lines += [f"skipped: {why}" for why in result.skipped]
    counts = ", ".join(f"{kind} {n}" for kind, n in result.counts().items())
    lines.append(f"{len(result.findings)} finding(s): {counts}" if result.findings else "nothing found")
    return secrets.scrub("\n".join(lines))


class PeriodicAudit:
    """The controller's audit every ``audit_interval`` seconds, in a worker process of its own (started on
    the first run, then kept), from a thread of its own: it holds no lock a CSI call needs and takes none
    of the CSI calls' workers. ``counts`` is what the metric shows (None until the first audit ends)."""

    def __init__(self, settings: Settings, store: ConnectorStore) -> None:
        self.settings = settings
        self.store = store
        self.counts: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="audit", daemon=True)
        self._pool: Any = None

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        from mbs_csi.controller.client import BackendClient
        from mbs_csi.controller.pool import WorkerPool
        from mbs_csi.controller.worker_config import worker_config

        settings = self.settings
        while not self._stop.wait(settings.audit_interval):
            if self._pool is None:
                self._pool = WorkerPool(worker_config(audit_settings(settings)), 1, settings.backend_timeout)
                self._pool.start()
            try:
                result = find(BackendClient(self._pool), self.store, settings.connector_store)
            except errors.CSIError as exc:
                log.warning("audit failed: %s", exc)
                continue
            self.counts = result.counts()
            if result.findings:
                log.warning(
                    "audit: %d finding(s) (%s); run `mbs-csi controller audit` for the list",
                    len(result.findings),
                    ", ".join(f"{k} {n}" for k, n in self.counts.items() if n),
                )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._pool is not None:
            self._pool.close()
