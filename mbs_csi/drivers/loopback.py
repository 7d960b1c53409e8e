"""Loopback backend: a Cinder volume driver keeping volumes as sparse files, exposed on loop devices.

Load it like any Cinder driver, e.g. through cinderlib::

    cinderlib.Backend(volume_backend_name="dev",
                      volume_driver="mbs_csi.drivers.loopback.LoopbackDriver",
                      loopback_dir="/var/lib/mbs-csi/loopback")

Layout under ``loopback_dir``:

- ``volume-<id>``: a volume, a sparse file of exactly ``size`` GiB;
- ``snapshot-<id>``: a snapshot, a full copy of its volume taken when it was created;
- ``.tmp-<name>``: the create or copy of volume or snapshot ``<name>`` in progress, given its real
  name only once complete, so a crash never leaves a half-written file under a volume or snapshot name.
  It is written under the lock of ``<name>`` (below); one whose lock nobody holds was left by a crash,
  and is removed when the backend starts and when ``<name>`` is deleted (the retry of a failed create
  deletes what the failed attempt left);

Clones and snapshots are copies: instant and space-sharing (reflink) where the filesystem supports it
(btrfs, XFS with reflink), sparse copies elsewhere. A snapshot of a volume that is being written to is
crash-consistent at best, like pulling the power cord.

Connections are ``driver_volume_type: local``: the file is bound to a loop device (``/dev/loopN``) which
os-brick's LOCAL connector hands over as is.

The files and loop devices of one volume or snapshot are made and changed under its lock from
``cinder.coordination``, so that processes sharing ``loopback_dir`` (the controller's backend workers)
never bind a volume twice, detach a device another is handing out, or remove a temp file another is
writing. cinderlib starts that coordinator with tooz's file backend: its locks are files in cinder's lock
directory and hold across every process using that directory, as the workers all do, and a process that
dies lets go of its locks. A lock file is removed once its volume's or snapshot's file is gone.

**Single host by nature.** A loop device exists only on the host that made it, so the controller and the
node using a volume must be the same machine. This backend is for development, the quick start and tests,
never for a cluster.

The driver runs as root and calls ``losetup`` and ``cp`` directly (no sudo, no rootwrap).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cinder import coordination, exception
from cinder.volume import configuration, driver, volume_utils
from oslo_config import cfg

LOG = logging.getLogger(__name__)

GiB = 1024**3
VERSION = "1.0.0"
TMP_PREFIX = ".tmp-"

# How long to wait for another process holding a volume's lock, and for one losetup call.
LOCK_TIMEOUT_S = 60.0
LOSETUP_TIMEOUT_S = 60.0

loopback_opts = [
    cfg.StrOpt(
        "loopback_dir",
        help="Directory holding the volume and snapshot files (created if missing). Required. Its "
        "filesystem's capacity is the backend's capacity.",
    ),
    cfg.BoolOpt(
        "loopback_remove_interrupted_at_start",
        default=True,
        help="Remove the temp files of interrupted creates and copies when the backend starts. The audit "
        "(``mbs-csi controller audit``) starts its worker without it, to report them before removing any.",
    ),
]

# Registered in the shared group like every Cinder driver: cinderlib validates a backend's options by
# importing this module and setting them in ``backend_defaults``.
cfg.CONF.register_opts(loopback_opts, group=configuration.SHARED_CONF_GROUP)


def _fail(message: str) -> exception.VolumeBackendAPIException:
    return exception.VolumeBackendAPIException(data=message)


def _run(cmd: list[str], timeout: float | None = None) -> str:
    """Run a command, return its stdout; raise VolumeBackendAPIException with its stderr on failure."""
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _fail(f"{' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise _fail(f"{' '.join(cmd)}: {detail}")
    return proc.stdout


# -- loop devices ---------------------------------------------------------------------------------------


def loop_devices(path: Path) -> list[tuple[str, bool]]:
    """The loop devices bound to ``path`` as (device, autoclear) pairs; none if the file is missing.

    A device with autoclear set was detached while still open: the kernel frees it when its last user
    closes it, so it must not be handed out again.
    """
    out = _run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,AUTOCLEAR", "--associated", str(path)],
        LOSETUP_TIMEOUT_S,
    )
    devices = []
    for line in out.splitlines():
        fields = line.split()
        if fields:
            devices.append((fields[0], len(fields) > 1 and fields[1] == "1"))
    return devices


def attach_loop(path: Path) -> str:
    """Bind ``path`` to a free loop device and return the device."""
    device = _run(["losetup", "--find", "--show", str(path)], LOSETUP_TIMEOUT_S).strip()
    if not device.startswith("/dev/"):
        raise _fail(f"losetup did not name a loop device for {path}: {device!r}")
    return device


def detach_loops(path: Path) -> None:
    """Release every loop device bound to ``path``; a device still open is freed when last closed."""
    for device, _autoclear in loop_devices(path):
        try:
            _run(["losetup", "--detach", device], LOSETUP_TIMEOUT_S)
        except exception.VolumeBackendAPIException:
            # Freed in the meantime (autoclear) is fine; anything still bound is an error.
            if device in (d for d, _ in loop_devices(path)):
                raise
    busy = [device for device, _ in loop_devices(path)]
    if busy:
        LOG.warning("Loop device(s) %s of %s still open: they are released when last closed", busy, path)


def refresh_loops(path: Path) -> None:
    """Make the loop devices bound to ``path`` pick up its new size."""
    for device, _autoclear in loop_devices(path):
        _run(["losetup", "--set-capacity", device], LOSETUP_TIMEOUT_S)


# -- files -------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Give a complete temp file its real name; refuse to replace an existing file."""
    _fsync_file(tmp)
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise _fail(f"{final} already exists") from None
    finally:
        tmp.unlink()
    _fsync_dir(final.parent)


def grow(path: Path, size_bytes: int) -> None:
    """Grow ``path`` to ``size_bytes`` (sparse); refuse to shrink it."""
    current = path.stat().st_size
    if size_bytes < current:
        raise _fail(f"cannot shrink {path} from {current} to {size_bytes} bytes")
    if size_bytes > current:
        os.truncate(path, size_bytes)


class LoopbackDriver(driver.VolumeDriver):
    """Sparse files in ``loopback_dir`` exposed on loop devices; single host, for development only."""

    VERSION = VERSION

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.configuration:
            self.configuration.append_config_values(loopback_opts)
        self._dir: Path | None = None

    # -- set-up ----------------------------------------------------------------------------------------

    @property
    def loopback_dir(self) -> Path:
        if self._dir is None:
            value = self.configuration.safe_get("loopback_dir") if self.configuration else None
            if not value:
                raise exception.InvalidConfigurationValue(
                    "loopback_dir is required: the directory that holds the loopback backend's volume files"
                )
            self._dir = Path(value)
        return self._dir

    def do_setup(self, context: Any) -> None:
        try:
            self.loopback_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _fail(f"cannot create loopback_dir {self.loopback_dir}: {exc.strerror}") from exc

    def check_for_setup_error(self) -> None:
        for tool in ("losetup", "cp"):
            if shutil.which(tool) is None:
                raise _fail(f"{tool} not found in PATH (install util-linux / coreutils)")
        try:
            tempfile.TemporaryFile(dir=self.loopback_dir).close()  # unnamed where the kernel can
        except OSError as exc:
            raise _fail(f"loopback_dir {self.loopback_dir} is not writable: {exc.strerror}") from exc
        if not Path("/dev/loop-control").exists():
            raise _fail("/dev/loop-control is missing: this host (or container) cannot create loop devices")
        if self.configuration.safe_get("loopback_remove_interrupted_at_start") is not False:
            self.remove_leftovers()

    def _interrupted(self, remove: bool) -> list[str]:
        """The temp files that crashed creates and copies left: those whose lock is free (a live process
        writing one holds its lock: its file stays); removed when ``remove``."""
        found = []
        for tmp in sorted(self.loopback_dir.glob(f"{TMP_PREFIX}*")):
            name = tmp.name.removeprefix(TMP_PREFIX)
            # Lock files are removed by glob pattern: a name that is one is not ours to lock.
            if not name or name.startswith(".") or glob.escape(name) != name:
                continue
            with self._lock(name, blocking=False) as held:
                if held and tmp.exists():
                    found.append(tmp.name)
                    if remove:
                        self._remove_tmp(name)
        return found

    def leftovers(self) -> list[str]:
        """The ``.tmp-*`` files crashed creates and copies left (provably abandoned: nobody holds their lock)."""
        return self._interrupted(remove=False)

    def remove_leftovers(self) -> list[str]:
        """Remove :meth:`leftovers`; returns what was removed."""
        return self._interrupted(remove=True)

    # -- paths -----------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise _fail(f"invalid volume or snapshot name {name!r}")
        return self.loopback_dir / name

    def local_path(self, volume: Any) -> str:
        return str(self._path(volume.name))

    @contextlib.contextmanager
    def _lock(self, name: str, blocking: bool | float) -> Iterator[bool]:
        """Hold the inter-process lock of volume or snapshot ``name`` (yield True), or yield False when
        ``blocking`` (False, or seconds to wait) ran out first; drop the lock file once ``name`` is gone.

        Waiting polls (tooz's file lock tries a non-blocking lock, then sleeps), so an eventlet-patched
        process keeps running its other green threads. A process still waiting on a removed lock file may
        get it while a newcomer locks a new file of that name: both then find the volume's file gone, and
        nothing is left for the lock to guard (volume names are never reused).
        """
        path = self._path(name)
        lock_name = f"loopback-{name}"
        lock = coordination.COORDINATOR.get_lock(lock_name)
        if not lock.acquire(blocking=blocking):
            yield False
            return
        try:
            yield True
        finally:
            try:
                if not path.exists():
                    coordination.synchronized_remove(lock_name)
            finally:
                lock.release()

    @contextlib.contextmanager
    def _volume_lock(self, name: str) -> Iterator[Path]:
        """Hold the lock of volume or snapshot ``name`` (waiting for it up to LOCK_TIMEOUT_S), yield its path."""
        with self._lock(name, blocking=LOCK_TIMEOUT_S) as held:
            if not held:
                raise _fail(f"timed out after {LOCK_TIMEOUT_S:.0f}s waiting for the lock of {name}")
            yield self._path(name)

    def _tmp_path(self, name: str) -> Path:
        return self.loopback_dir / f"{TMP_PREFIX}{name}"

    def _remove_tmp(self, name: str) -> None:
        """Remove the temp file of ``name`` that an interrupted create or copy left (hold its lock)."""
        tmp = self._tmp_path(name)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            LOG.warning("Removed %s, left by an interrupted create or copy", tmp)

    def _existing(self, name: str, what: str) -> Path:
        path = self._path(name)
        if not path.is_file():
            raise _fail(f"{what} file {path} does not exist")
        return path

    # -- volumes and snapshots ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _new_file(self, name: str, doing: str) -> Iterator[Path]:
        """A temp path for the caller to fill, under ``name``'s lock; it becomes ``name`` (never
        overwriting) once the block ends."""
        with self._volume_lock(name) as final:
            if final.exists():
                raise _fail(f"{final} already exists")
            self._remove_tmp(name)
            tmp = self._tmp_path(name)
            try:
                yield tmp
                publish(tmp, final)
            except OSError as exc:
                raise _fail(f"cannot {doing} {final}: {exc.strerror}") from exc
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def create_volume(self, volume: Any) -> None:
        with self._new_file(volume.name, "create") as tmp, open(tmp, "xb") as f:
            f.truncate(volume.size * GiB)
        LOG.info("Created loopback volume %s (%d GiB)", self._path(volume.name), volume.size)

    def _copy(self, source: Path, name: str, size_gib: int | None) -> None:
        """Copy ``source`` to a new file ``name`` (reflink or sparse), grown to ``size_gib`` if given."""
        with self._new_file(name, f"copy {source} to") as tmp:
            _run(["cp", "--reflink=auto", "--sparse=always", str(source), str(tmp)])
            if size_gib is not None:
                grow(tmp, size_gib * GiB)
        LOG.info("Copied %s to %s", source, self._path(name))

    def create_cloned_volume(self, volume: Any, src_vref: Any) -> None:
        self._copy(self._existing(src_vref.name, "source volume"), volume.name, volume.size)

    def create_snapshot(self, snapshot: Any) -> None:
        self._copy(self._existing(snapshot.volume_name, "volume"), snapshot.name, None)

    def create_volume_from_snapshot(self, volume: Any, snapshot: Any) -> None:
        self._copy(self._existing(snapshot.name, "snapshot"), volume.name, volume.size)

    def delete_volume(self, volume: Any) -> None:
        with self._volume_lock(volume.name) as path:
            detach_loops(path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._remove_tmp(volume.name)
        LOG.info("Deleted loopback volume %s", path)

    def delete_snapshot(self, snapshot: Any) -> None:
        with self._volume_lock(snapshot.name) as path:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._remove_tmp(snapshot.name)

    def extend_volume(self, volume: Any, new_size: int) -> None:
        with self._volume_lock(volume.name):
            path = self._existing(volume.name, "volume")
            try:
                grow(path, new_size * GiB)
            except OSError as exc:
                raise _fail(f"cannot extend {path}: {exc.strerror}") from exc
            refresh_loops(path)
        LOG.info("Extended loopback volume %s to %d GiB", path, new_size)

    def manage_existing_get_size(self, volume: Any, existing_ref: dict[str, Any]) -> int:
        """Size in GiB of the file named by ``existing_ref["source-name"]`` (Cinder's manage API; the
        controller uses it to tell whether a volume is still there)."""
        path = self._path(str(existing_ref.get("source-name", "")))
        if not path.is_file():
            raise exception.ManageExistingInvalidReference(existing_ref=existing_ref, reason=f"{path} does not exist")
        return -(-path.stat().st_size // GiB)

    def retype(self, context: Any, volume: Any, new_type: Any, diff: Any, host: Any) -> bool:
        """Accept a new volume type that differs in its QoS specs only, and refuse any other change.

        A file on a loop device cannot enforce a QoS limit (``total_iops_sec`` and the like): the limits
        are only recorded, in the volume's type, where the controller keeps them. Extra specs describe
        what the storage does (replication, placement...), which this driver has nothing of.
        """
        changed = sorted(
            key
            for section in ("extra_specs", "encryption")
            for key, (old, new) in ((diff or {}).get(section) or {}).items()
            if old != new
        )
        if changed:
            LOG.info("Loopback volume %s cannot take %s: retype refused", volume.name, changed)
            return False
        LOG.info("Loopback volume %s retyped to %s (QoS recorded, not enforced)", volume.name, new_type.id)
        return True

    def _manageable(self, prefix: str, known: list[Any], extract: Any) -> list[dict[str, Any]]:
        ids = {resource["id"] for resource in known}
        found = []
        with os.scandir(self.loopback_dir) as entries:
            for entry in entries:
                if not entry.name.startswith(prefix) or not entry.is_file(follow_symlinks=False):
                    continue
                resource_id = extract(entry.name)
                found.append(
                    {
                        "reference": {"source-name": entry.name},
                        "size": -(-entry.stat(follow_symlinks=False).st_size // GiB),
                        "cinder_id": resource_id if resource_id in ids else None,
                        "safe_to_manage": resource_id not in ids,
                        "reason_not_safe": "already managed" if resource_id in ids else None,
                        "extra_info": None,
                    }
                )
        return found

    def get_manageable_volumes(
        self,
        cinder_volumes: list[Any],
        marker: Any,
        limit: int,
        offset: int,
        sort_keys: list[str],
        sort_dirs: list[str],
    ) -> list[dict[str, Any]]:
        """The volume files in ``loopback_dir`` (Cinder's manage API; the audit lists the storage with it)."""
        found = self._manageable(
            cfg.CONF.volume_name_template % "", cinder_volumes, volume_utils.extract_id_from_volume_name
        )
        return volume_utils.paginate_entries_list(found, marker, limit, offset, sort_keys, sort_dirs)

    def get_manageable_snapshots(
        self,
        cinder_snapshots: list[Any],
        marker: Any,
        limit: int,
        offset: int,
        sort_keys: list[str],
        sort_dirs: list[str],
    ) -> list[dict[str, Any]]:
        """The snapshot files in ``loopback_dir`` (snapshots are files of their own, with no parent image)."""
        found = self._manageable(
            cfg.CONF.snapshot_name_template % "", cinder_snapshots, volume_utils.extract_id_from_snapshot_name
        )
        return volume_utils.paginate_entries_list(found, marker, limit, offset, sort_keys, sort_dirs)

    # -- exports and connections ----------------------------------------------------------------------

    def create_export(self, context: Any, volume: Any, connector: Any) -> None:
        pass

    def ensure_export(self, context: Any, volume: Any) -> None:
        pass

    def remove_export(self, context: Any, volume: Any) -> None:
        pass

    def initialize_connection(self, volume: Any, connector: Any, **kwargs: Any) -> dict[str, Any]:
        with self._volume_lock(volume.name):
            path = self._existing(volume.name, "volume")
            reusable = [device for device, autoclear in loop_devices(path) if not autoclear]
            device = reusable[0] if reusable else attach_loop(path)
        LOG.info("Loopback volume %s is on %s", path, device)
        return {"driver_volume_type": "local", "data": {"device_path": device}}

    def terminate_connection(self, volume: Any, connector: Any, **kwargs: Any) -> None:
        with self._volume_lock(volume.name) as path:
            detach_loops(path)

    # -- stats -------------------------------------------------------------------------------------------

    def _provisioned_bytes(self) -> int:
        prefix = cfg.CONF.volume_name_template % ""
        total = 0
        with os.scandir(self.loopback_dir) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat(follow_symlinks=False).st_size
        return total

    def _update_volume_stats(self) -> None:
        fs = os.statvfs(self.loopback_dir)
        capacity = {
            "total_capacity_gb": round(fs.f_blocks * fs.f_frsize / GiB, 2),
            "free_capacity_gb": round(fs.f_bavail * fs.f_frsize / GiB, 2),
            "provisioned_capacity_gb": round(self._provisioned_bytes() / GiB, 2),
            "reserved_percentage": 0,
            "thin_provisioning_support": True,
            "thick_provisioning_support": False,
            "multiattach": False,
            "QoS_support": False,
        }
        backend_name = (self.configuration.safe_get("volume_backend_name") if self.configuration else None) or (
            "loopback"
        )
        self._stats = {
            **capacity,
            "volume_backend_name": backend_name,
            "vendor_name": "mbs-csi",
            "driver_version": self.VERSION,
            "storage_protocol": "local",
            "pools": [{"pool_name": backend_name, **capacity}],
        }
