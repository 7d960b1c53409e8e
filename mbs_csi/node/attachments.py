"""``mbs-csi node attachments``: the volumes staged on this node, checked against reality, as Vdsm's
``volumes_info`` lists managed volumes with an ``exists`` flag; with each its state (``attaching``: a
stage that stopped halfway, which a retry or the next start of the node plugin finishes or undoes) and
the targets it is published at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mbs_csi.node.inspection import attachment_problem
from mbs_csi.node.store import ATTACHING, FILENAME, AttachmentStore


def list_attachments(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / FILENAME
    if not path.exists():
        return []
    rows = []
    store = AttachmentStore(path)
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
    store.close()
    return rows


def render(rows: list[dict[str, Any]], as_json: bool) -> str:
    if as_json:
        return json.dumps(rows, indent=2)
    if not rows:
        return "no volume is staged on this node"
    lines = []
    for row in rows:
        kind = f"{row['access_type']} {row['fs_type']}".strip()
        exists = "yes" if row["exists"] else f"no ({row['problem']})"
        targets = f"  published at: {', '.join(row['targets'])}" if row["targets"] else ""
        lines.append(
            f"{row['volume_id']}  {row['device_path']}  {row['staging_path']}  {kind}  exists: {exists}{targets}"
        )
    return "\n".join(lines)
