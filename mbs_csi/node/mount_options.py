"""mount(8)-style option names, as mount(2) takes them: per-mount flags and filesystem data.

mount(8)'s option handling, without mount(8): the per-mount flags by name, fstab-only options dropped,
everything else passed to the filesystem. Standard library only: the node role must start fast.
"""

from __future__ import annotations

from collections.abc import Sequence

# Kernel mount flags (<linux/mount.h>).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_SILENT = 32768
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# Option name -> (flag, True to set it / False to clear it), the names mount(8) knows.
_FLAG_OPTIONS: dict[str, tuple[int, bool]] = {
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True),
    "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "mand": (MS_MANDLOCK, True),
    "nomand": (MS_MANDLOCK, False),
    "noatime": (MS_NOATIME, True),
    "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True),
    "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True),
    "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True),
    "nostrictatime": (MS_STRICTATIME, False),
    "lazytime": (MS_LAZYTIME, True),
    "nolazytime": (MS_LAZYTIME, False),
    "nosymfollow": (MS_NOSYMFOLLOW, True),
    "symfollow": (MS_NOSYMFOLLOW, False),
    "silent": (MS_SILENT, True),
    "loud": (MS_SILENT, False),
}
# Options that mean something to mount(8) and fstab only: the kernel must never see them.
_USERSPACE_OPTIONS = frozenset(
    {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail", "_netdev"}
)
_USERSPACE_PREFIXES = ("x-", "X-", "comment=", "helper=", "uhelper=")


def parse(options: Sequence[str]) -> tuple[int, str]:
    """Split mount(8)-style option names into (mount flags, filesystem data), as mount(8) does.

    Flag names (``ro``, ``nosuid``, ``noatime``...) become bits, later names overriding earlier ones;
    fstab-only options (``defaults``, ``_netdev``, ``nofail``, ``x-*``...) are dropped; everything else
    (``discard``, ``nouuid``, ``data=ordered``, ``context=...``) goes to the filesystem, comma-joined.
    """
    flags = 0
    data: list[str] = []
    for option in (o.strip() for o in ",".join(options).split(",")):
        if not option or option in _USERSPACE_OPTIONS or option.startswith(_USERSPACE_PREFIXES):
            continue
        if option in _FLAG_OPTIONS:
            bit, on = _FLAG_OPTIONS[option]
            flags = flags | bit if on else flags & ~bit
        else:
            data.append(option)
    return flags, ",".join(data)
