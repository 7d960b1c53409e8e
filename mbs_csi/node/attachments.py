"""``mbs-csi node attachments``: the volumes staged on this node, checked against reality, as Vdsm's
``volumes_info`` lists managed volumes with an ``exists`` flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mbs_csi.node.inspection import attachment_problem
from mbs_csi.node.store import FILENAME, AttachmentStore


def list_attachments(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / FILENAME
    if not path.exists():
        return []
    rows = []
    for attachment in AttachmentStore(path).all():
        problem = attachment_problem(attachment)
        rows.append(
            {
                "volume_id": attachment.volume_id,
                "device_path": attachment.device_path,
                "staging_path": attachment.staging_path,
                "access_type": attachment.access_type,
                "fs_type": attachment.fs_type,
                "exists": problem is None,
                "problem": problem,
            }
        )
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
        lines.append(f"{row['volume_id']}  {row['device_path']}  {row['staging_path']}  {kind}  exists: {exists}")
    return "\n".join(lines)
