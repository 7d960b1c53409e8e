"""Run Python in a child process that reports one JSON document on the last line of its stdout: for work
that patches process-global state (cinderlib's setup, eventlet, os-brick's privsep) or needs a fresh
interpreter."""

from __future__ import annotations

import json
import sys
from typing import Any

from testkit.host import REPO
from testkit.processes import run_tree

TAIL = 3000  # characters of the child's output a failure shows


def run_python_json(*args: str, timeout: float = 300) -> Any:
    """``python ARGS`` from the repository root; fails with the end of its output unless it exits 0."""
    done = run_tree([sys.executable, *args], timeout, cwd=REPO)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout[-TAIL:]}\n{done.stderr[-TAIL:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])
