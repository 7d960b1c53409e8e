"""What a block device holds and how big it is: blkid's low-level probe and blockdev's size.

Standard library only: the node role must start fast and stay small.
"""

from __future__ import annotations

import os

from mbs_csi.node.commands import QUICK_TIMEOUT, run, trim_output
from mbs_csi.node.mount_error import MountError

# blkid exit codes (blkid(8)).
_BLKID_NOTHING_FOUND = 2
_BLKID_AMBIVALENT = 8


def _check_readable(device: str) -> None:
    """Raise MountError unless ``device`` exists and its first block can be read.

    blkid answers "nothing found" (exit 2) also for a device it cannot open or read: this tells a blank
    device from a missing or broken one.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"cannot open device {device}: {exc.strerror}") from exc
    try:
        os.pread(fd, 4096, 0)
    except OSError as exc:
        raise MountError(f"cannot read device {device}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def probe(device: str, *, timeout: float = QUICK_TIMEOUT) -> dict[str, str]:
    """Low-level probe of ``device`` (``blkid -p -o export``): ``{}`` when blkid finds nothing.

    Keys are blkid's (``TYPE``, ``USAGE``, ``PTTYPE``, ``UUID``...): ``TYPE`` is the content's type
    (``ext4``, ``xfs``, ``swap``, ``crypto_LUKS``...), absent for a device with only a partition table.
    Raises MountError when the device is missing or unreadable, when blkid fails, and when the result is
    ambivalent (several signatures, e.g. leftovers of an earlier filesystem): such a device is neither
    blank nor safely mountable.
    """
    argv = ["blkid", "-p", "-o", "export", device]
    result = run(argv, f"probing {device}", timeout, ok_codes=(0, _BLKID_NOTHING_FOUND, _BLKID_AMBIVALENT))
    if result.returncode == _BLKID_AMBIVALENT:
        raise MountError(
            f"{device} carries several signatures (ambivalent probe result); inspect it with 'wipefs {device}': "
            f"{trim_output(result.stderr)}",
            command=argv,
            returncode=result.returncode,
            stderr=trim_output(result.stderr),
        )
    if result.returncode == _BLKID_NOTHING_FOUND:
        _check_readable(device)
        return {}
    values: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def block_device_size(device: str, *, timeout: float = QUICK_TIMEOUT) -> int:
    """Size of the block device in bytes (``blockdev --getsize64``)."""
    result = run(["blockdev", "--getsize64", device], f"reading the size of {device}", timeout)
    try:
        return int(result.stdout.strip())
    except ValueError as exc:
        raise MountError(f"reading the size of {device} failed: unexpected output {result.stdout.strip()!r}") from exc
