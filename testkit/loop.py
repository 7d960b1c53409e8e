"""Loop devices over sparse files, through losetup: make, attach, find and detach them."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# The marks of a test module that runs the node's code in-process on real loop devices: it needs root,
# and os-brick's privsep and oslo's eventlet helpers warn about things that do not concern the tests.
NODE_IN_PROCESS = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/loop-control"), reason="needs root and loop devices"
    ),
    pytest.mark.filterwarnings("ignore:Using fork:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:oslo_utils.eventletutils"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:oslo_service.eventlet_backdoor"),
]

COMMAND_TIMEOUT = 60.0


def _losetup(*args: str) -> str:
    return subprocess.run(
        ["losetup", *args], check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    ).stdout


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def attach(backing: Path, read_only: bool = False) -> str:
    """Bind a free loop device to ``backing``; return the device's path."""
    return _losetup("--find", "--show", *(["--read-only"] if read_only else []), str(backing)).strip()


def detach(device: str) -> None:
    """Detach ``device``; one already gone is fine."""
    subprocess.run(["losetup", "--detach", device], check=False, capture_output=True, timeout=COMMAND_TIMEOUT)


def reread_capacity(device: str) -> None:
    """Make ``device`` follow its backing file's new size."""
    _losetup("--set-capacity", device)


def devices_backed_by(path: Path) -> list[str]:
    """The loop devices bound to the file ``path``."""
    return _losetup("--list", "--noheadings", "--output", "NAME", "--associated", str(path)).split()


def devices_under(directory: Path) -> list[str]:
    """Every loop device whose backing file is under ``directory`` (deleted backing files included)."""
    found = []
    for line in _losetup("--list", "--noheadings", "--output", "NAME,BACK-FILE").splitlines():
        name, _, back = line.strip().partition(" ")
        if back.strip().startswith(f"{directory}/"):
            found.append(name)
    return found


@contextlib.contextmanager
def loop_device(backing: Path, size: int) -> Iterator[str]:
    """A sparse file of ``size`` bytes at ``backing`` on a loop device, detached afterwards."""
    device = attach(sparse_file(backing, size))
    try:
        yield device
    finally:
        detach(device)
