"""``mbs-csi backend check``: initialise backends exactly as the controller does and report their stats
or why they fail, the way oVirt's engine tests a storage domain's parameters before storing them."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mbs_csi import errors, secrets
from mbs_csi.config import Backend, Settings
from mbs_csi.controller.client import BackendClient
from mbs_csi.controller.pool import WorkerPool
from mbs_csi.controller.worker_config import worker_config


@dataclasses.dataclass
class Report:
    backend: Backend
    stats: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {**self.backend.describe(), "ok": self.ok, "stats": self.stats, "error": self.error}


def check(settings: Settings, names: list[str]) -> list[Report]:
    """Initialise the named backends (all when ``names`` is empty) in a worker and collect their stats."""
    known = {b.name: b for b in settings.backends}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise errors.ConfigError(
            "command line", "backend", f"unknown backend(s) {', '.join(unknown)}; configured: {', '.join(known)}"
        )
    chosen = [known[n] for n in names] if names else list(settings.backends)
    pool = WorkerPool(
        worker_config(dataclasses.replace(settings, backends=tuple(chosen), log_level="WARNING")),
        size=1,
        call_timeout=settings.backend_timeout,
    )
    pool.start()
    client = BackendClient(pool)
    reports = []
    try:
        for backend in chosen:
            try:
                reports.append(Report(backend, stats=client.stats(backend.name)))
            except errors.CSIError as exc:
                reports.append(Report(backend, error=secrets.scrub(str(exc))))
    finally:
        pool.close()
    return reports


def _gib(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f} GiB"


def render(reports: list[Report], as_json: bool) -> str:
    if as_json:
        return json.dumps([r.as_dict() for r in reports], indent=2, default=str)
    lines = []
    for report in reports:
        shown = report.backend.describe()
        options = {**shown["driver_options"], **shown["driver_sensitive_options"]}
        lines.append(f"{report.backend.name}: {'OK' if report.ok else 'FAILED'}")
        lines.append(f"  volume_driver: {report.backend.volume_driver}")
        lines.append("  options: " + (", ".join(f"{k}={v}" for k, v in options.items()) or "none"))
        if report.stats is not None:
            s = report.stats
            lines.append(
                f"  protocol: {s['storage_protocol']}, vendor: {s['vendor_name']}, "
                f"driver version: {s['driver_version']}, pools: {', '.join(map(str, s['pools']))}"
            )
            lines.append(
                f"  capacity: {_gib(s['total_capacity_gb'])} total, {_gib(s['free_capacity_gb'])} free; "
                f"thin provisioning: {'yes' if s['thin_provisioning'] else 'no'}; "
                f"multiattach: {'yes' if s['multiattach'] else 'no'}"
            )
        else:
            lines.append(f"  error: {report.error}")
    return "\n".join(lines)
