"""A backend driver's stats, reduced to what the controller and ``backend check`` use."""

from __future__ import annotations

from typing import Any

CONSISTENT_GROUP_SNAPSHOT = "consistent_group_snapshot_enabled"


def _gib(value: Any) -> float | None:
    """Cinder reports capacities in GiB, or as 'infinite'/'unknown'."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _total(values: list[float | None]) -> float | None:
    """The sum, or None when any value is unknown."""
    known = [v for v in values if v is not None]
    return sum(known) if len(known) == len(values) else None


def summarize_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The driver's stats reduced to what the controller and ``backend check`` use."""
    pools = stats.get("pools") or [stats]
    return {
        "total_capacity_gb": _total([_gib(p.get("total_capacity_gb")) for p in pools]),
        "free_capacity_gb": _total([_gib(p.get("free_capacity_gb")) for p in pools]),
        "storage_protocol": stats.get("storage_protocol"),
        "vendor_name": stats.get("vendor_name"),
        "driver_version": stats.get("driver_version"),
        "thin_provisioning": any(p.get("thin_provisioning_support") for p in pools),
        "multiattach": bool(stats.get("multiattach")) or any(p.get("multiattach") for p in pools),
        "pools": [p.get("pool_name") for p in pools],
        # Cinder's capability of drivers whose group snapshots are taken at one point in time.
        "consistent_group_snapshot": bool(stats.get(CONSISTENT_GROUP_SNAPSHOT))
        or any(p.get(CONSISTENT_GROUP_SNAPSHOT) for p in pools),
    }
