"""``mbs-csi node attachments``: the volumes staged on this node, checked against reality, as Vdsm's
``volumes_info`` lists managed volumes with an ``exists`` flag; with each its state (``attaching``: a
stage that stopped halfway, which a retry or the next start of the node plugin finishes or undoes) and
the targets it is published at; and what the node plugin found and fixed when it last started.

``--json`` prints ``{"attachments": [...], "last_start": {"at": ..., "fixes": [...]} or null}``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mbs_csi.node.inspection import attachment_problem
from mbs_csi.node.store import ATTACHING, FILENAME, AttachmentStore


def list_attachments(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / FILENAME
    if not path.exists():
        return []
    with AttachmentStore(path) as store:
        return _rows(store)


def last_start(state_dir: Path) -> dict[str, Any] | None:
    """When the node plugin last started (UTC, ISO 8601) and what it fixed then; None if it never did."""
    path = state_dir / FILENAME
    if not path.exists():
        return None
    with AttachmentStore(path) as store:
        start = store.last_start()
    if start is None:
        return None
    return {"at": datetime.fromtimestamp(start.at, UTC).isoformat(timespec="seconds"), "fixes": list(start.fixes)}


def _rows(store: AttachmentStore) -> list[dict[str, Any]]:
    rows = []
    for attachment in store.all():
        problem = "a stage that stopped halfway" if attachment.state == ATTACHING else attachment_problem(attachment)
        rows.append(
            {
                "volume_id": attachment.volume_id,
                "device_path": attachment.device_path,
                "staging_path": attachment.staging_path,
                "access_type": attachment.access_type,
                "fs_type": attachment.fs_type,
                "state": attachment.state,
                "targets": [p.target_path for p in store.publications(attachment.volume_id)],
                "exists": problem is None,
                "problem": problem,
            }
        )
    return rows


def render(rows: list[dict[str, Any]], start: dict[str, Any] | None, as_json: bool) -> str:
    if as_json:
        return json.dumps({"attachments": rows, "last_start": start}, indent=2)
    lines = [] if rows else ["no volume is staged on this node"]
    for row in rows:
        kind = f"{row['access_type']} {row['fs_type']}".strip()
        exists = "yes" if row["exists"] else f"no ({row['problem']})"
        targets = f"  published at: {', '.join(row['targets'])}" if row["targets"] else ""
        lines.append(
            f"{row['volume_id']}  {row['device_path']}  {row['staging_path']}  {kind}  exists: {exists}{targets}"
        )
    if start is not None:
        found = ", and found:" if start["fixes"] else "; nothing needed fixing"
        lines.append(f"node plugin last started {start['at']}{found}")
        lines.extend(f"  {fix}" for fix in start["fixes"])
    return "\n".join(lines)
