"""What a block device holds and how big it is: blkid's low-level probe and blockdev's size; whether a
path is a block device nobody else uses (:func:`unused_block_device`); whether it reads as zeros.

Standard library only: the node role must start fast and stay small.
"""

from __future__ import annotations

import errno
import os
import stat

from mbs_csi import errors
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


def unused_block_device(path: str) -> str:
    """The device node ``path`` leads to (links resolved), after checking that it is a block device that
    nothing holds: not mounted, not an LVM/device-mapper member, not open exclusively (the kernel's
    ``O_EXCL`` on a block device). NotFound when nothing is there, FailedPrecondition otherwise.
    """
    device = os.path.realpath(path)
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise errors.NotFound(f"device {path} does not exist on this node") from None
    except OSError as exc:
        raise MountError(f"cannot inspect device {path}: {exc.strerror}") from exc
    if not stat.S_ISBLK(st.st_mode):
        raise errors.FailedPrecondition(f"{path} is not a block device; refusing to use it")
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise errors.FailedPrecondition(
                f"device {path} is in use (mounted, or held by another device or program); refusing to use it"
            ) from None
        raise MountError(f"cannot open device {path}: {exc.strerror}") from exc
    return device


def reads_as_zeros(device: str, length: int) -> bool:
    """Whether the first ``length`` bytes of ``device`` (or all of a shorter one) are zeros."""
    try:
        with open(device, "rb", buffering=0) as f:
            data = f.read(length)
    except OSError as exc:
        raise MountError(f"cannot read device {device}: {exc.strerror}") from exc
    return not data.strip(b"\0")


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
