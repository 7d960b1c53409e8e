"""This machine as the harness uses it: the repository checkout, short scratch directories, free
localhost ports, and the capabilities this process holds."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CAP_SYS_RESOURCE = 24  # online ext4 growth needs it; a privileged node pod has it


def short_tmpdir(prefix: str = "mbs-") -> Path:
    """A fresh directory under /tmp: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_capability(bit: int) -> bool:
    """Whether this process holds the Linux capability numbered ``bit`` in its effective set."""
    with open("/proc/self/status") as status:
        effective = next(line for line in status if line.startswith("CapEff:")).split()[1]
    return bool(int(effective, 16) >> bit & 1)
