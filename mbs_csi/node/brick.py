"""The os-brick adapter: the only module of the project that imports ``os_brick``.

One os-brick *connector* per protocol attaches a volume to this host (iSCSI login, FC scan, NVMe-oF
connect, krbd map, or for ``local`` nothing at all) and hands back ``device_info``, whose ``path`` is the
block device to format/mount. This module wraps the four calls the node needs (connector properties,
connect, disconnect, extend) and turns every os-brick failure into a :class:`BrickError` whose message
names the operation, the protocol and the target, never a secret of the connection info.

os-brick is imported lazily, on first use: importing it costs ~0.3 s and ~75 MiB (it loads every
connector, oslo.config/log/concurrency/privsep and eventlet, unpatched), which the node role must not
pay just to start.

**Privileges.** os-brick 7 runs every root command through oslo.privsep (``run_as_root=True`` goes to
``os_brick.privileged.rootwrap.execute_root``; the ``root_helper`` argument is accepted everywhere but
ignored). :func:`setup_privileges` chooses how privsep entrypoints run:

* in-process (the default when the plugin runs as root, which a CSI node plugin does: it is a privileged
  container). privsep's value is dropping privileges in the caller while a root daemon does the work; a
  caller that is already root with every capability gains nothing from it, and the daemon costs a
  second Python process (~80 MiB), a start-up delay on the first call, and a ``privsep-helper`` that
  must be found on the PATH (sudo's ``secure_path`` hides the virtualenv's). So entrypoints run as plain
  function calls in this process.
* through a helper daemon (``helper_command``, default ``sudo <venv>/bin/privsep-helper`` when not root):
  the classic layout for a non-root caller. The absolute path is what makes it work under sudo.

``setup_privileges`` also gives os-brick its lock directory: the iSCSI, FC and NVMe-oF connectors take
external (file) locks and fail with ``RequiredOptError: lock_path`` without one. Pass a directory on the
host (under the node's state dir) so that two plugin instances overlapping during an upgrade share them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Mapping
from typing import Any

from mbs_csi import errors, secrets
from mbs_csi.publish_context import PROTOCOL_KEY

# os-brick's own default (os_brick.initiator.DEVICE_SCAN_ATTEMPTS_DEFAULT): how many times a connector
# rescans for the device of a volume whose target it reached.
DEVICE_SCAN_ATTEMPTS = 3
# Multipath is not used yet: every connector is made and every property collected without it.
MULTIPATH = False
DEFAULT_LOCK_PATH = os.path.join(tempfile.gettempdir(), "mbs-csi-os-brick-locks")

# Connection data keys that identify a target and are never secret: error messages name these only.
_SAFE_KEYS = (
    "volume_id",
    "device_path",
    "name",
    "target_portal",
    "target_iqn",
    "target_lun",
    "target_nqn",
    "target_wwn",
    "cluster_name",
)
_DETAIL_LIMIT = 400


class BrickError(errors.Internal):
    """Attaching, detaching or inspecting a volume through os-brick failed; the message says what to check."""

    def __init__(self, message: str, *, operation: str = "", protocol: str = "") -> None:
        super().__init__(message)
        self.operation = operation
        self.protocol = protocol


class UnknownProtocol(errors.FailedPrecondition, BrickError):
    """The connection info names a protocol os-brick has no connector for (FAILED_PRECONDITION)."""


_lock = threading.RLock()
_settings: tuple[str | None, str] | None = None  # (helper_command, lock_path) in force
_root_helper = ""
_connectors: dict[str, Any] = {}  # protocol name (upper case) -> its connector


def _import_os_brick() -> Any:
    """Import os-brick's pieces we use (once; later calls are dict look-ups) and return the package."""
    # oslo.privsep imports eventlet (without patching anything), which warns that it is deprecated, and
    # registers a before-fork hook warning on each fork, i.e. each command os-brick runs.
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    warnings.filterwarnings("ignore", message=r"Using fork\(\) is a bad idea", category=DeprecationWarning)
    import os_brick
    import os_brick.initiator.connector
    import os_brick.privileged

    return os_brick


def default_helper_command() -> str:
    """The virtualenv's ``privsep-helper`` under sudo (sudo's ``secure_path`` would not find it by name)."""
    return f"sudo {os.path.join(sys.prefix, 'bin', 'privsep-helper')}"


def setup_privileges(helper_command: str | None = None, *, lock_path: str | None = None) -> None:
    """Make os-brick's privileged calls work; idempotent, and cheap after the first call.

    ``helper_command=None``: in-process privsep when running as root (see the module docstring for why),
    else :func:`default_helper_command`. A string: privsep entrypoints run in a daemon started with that
    command (as root it needs no sudo, e.g. ``<venv>/bin/privsep-helper``). ``lock_path``: the directory
    for os-brick's file locks (created if missing), :data:`DEFAULT_LOCK_PATH` if not given.

    Calling again with other settings applies them; a privsep daemon started under the old ones is
    stopped, so do that only while no os-brick call is in flight.
    """
    global _settings, _root_helper
    if helper_command is None and os.geteuid() != 0:
        helper_command = default_helper_command()
    lock_path = os.path.abspath(lock_path or DEFAULT_LOCK_PATH)
    with _lock:
        if _settings == (helper_command, lock_path):
            return
        os_brick = _import_os_brick()
        from oslo_config import cfg

        os.makedirs(lock_path, mode=0o700, exist_ok=True)
        os_brick.setup(cfg.CONF)
        cfg.CONF.set_override("lock_path", lock_path, group="os_brick")
        if helper_command:
            cfg.CONF.set_override("helper_command", helper_command, group="privsep_osbrick")
        else:
            cfg.CONF.clear_override("helper_command", group="privsep_osbrick")
        for context in (os_brick.privileged.default, os_brick.privileged.brick_privsep_hide_output):
            context.stop()  # a daemon started under previous settings; no-op when none runs
            context.set_client_mode(bool(helper_command))
        # Ignored by os-brick 7 (every root command goes through privsep) but still part of its API.
        _root_helper = "sudo" if os.geteuid() != 0 else ""
        _settings = (helper_command, lock_path)


def _ensure_setup() -> None:
    if _settings is None:
        setup_privileges()


def _guess_ip() -> str:
    from oslo_utils import netutils

    address: str = netutils.get_my_ipv4()
    return address


def connector_properties(node_id: str) -> dict[str, Any]:
    """This node's os-brick connector properties, as the controller passes them to ``volume.connect``.

    ``host`` is ``node_id``; ``ip`` is the address of the default route's interface. Keys a
    protocol cannot provide here are simply absent (no ``initiator`` without
    ``/etc/iscsi/initiatorname.iscsi``). The result is JSON-serializable.

    Side effect (os-brick's): when the ``nvme`` CLI is installed and ``/etc/nvme/hostnqn`` or
    ``/etc/nvme/hostid`` is missing, os-brick creates them.
    """
    _ensure_setup()
    from os_brick.initiator import connector

    try:
        props = connector.get_connector_properties(
            _root_helper, _guess_ip(), MULTIPATH, enforce_multipath=False, host=node_id
        )
    except Exception as exc:
        raise BrickError(
            f"cannot collect this node's connector properties (multipath={MULTIPATH}): {_detail(exc, {})}",
            operation="connector properties",
        ) from exc
    return _json_copy(props)


def _split(connection_info: Mapping[str, Any], operation: str) -> tuple[str, dict[str, Any]]:
    protocol = connection_info.get(PROTOCOL_KEY) if isinstance(connection_info, Mapping) else None
    data = connection_info.get("data") if isinstance(connection_info, Mapping) else None
    if not isinstance(protocol, str) or not protocol:
        raise BrickError(
            f"{operation}: the connection info has no '{PROTOCOL_KEY}' naming the protocol", operation=operation
        )
    if not isinstance(data, Mapping):
        raise BrickError(
            f"{operation}: the {protocol} connection info has no 'data' mapping", operation=operation, protocol=protocol
        )
    data = copy.deepcopy(dict(data))  # os-brick may add keys to what it is given
    for value in _secret_values(data):
        secrets.register(value)  # so the log formatter scrubs it from os-brick's own log lines too
    return protocol, data


def _connector(protocol: str, operation: str) -> Any:
    from os_brick.initiator import connector

    name = protocol.upper()
    mapping = connector.get_connector_mapping()
    if name not in mapping:
        raise UnknownProtocol(
            f"{operation}: the connection info names protocol '{protocol}', for which os-brick has no connector on "
            f"this node; known protocols: {', '.join(sorted(mapping))}. Check the backend's driver "
            f"(its driver_volume_type) or the node image's os-brick version.",
            operation=operation,
            protocol=protocol,
        )
    with _lock:
        conn = _connectors.get(name)
        if conn is None:
            extra: dict[str, Any] = {}
            if name == "RBD":
                extra["do_local_attach"] = True  # a /dev/rbdN device (krbd), not a Python file object
            try:
                conn = connector.InitiatorConnector.factory(
                    name,
                    _root_helper,
                    use_multipath=MULTIPATH,
                    device_scan_attempts=DEVICE_SCAN_ATTEMPTS,
                    **extra,
                )
            except Exception as exc:
                raise BrickError(
                    f"{operation}: cannot set up os-brick's {name} connector: {_detail(exc, {})}",
                    operation=operation,
                    protocol=protocol,
                ) from exc
            _connectors[name] = conn
    return conn


def attach(connection_info: Mapping[str, Any]) -> dict[str, Any]:
    """Connect the volume to this host: os-brick's ``device_info``, ``{'type': ..., 'path': '/dev/...', ...}``.

    Idempotent as os-brick is: connecting an attached volume again returns its device. ``path`` is the
    device to use (for ``local`` exactly the ``device_path`` of the connection data, not checked to exist).
    """
    _ensure_setup()
    operation = "attach"
    protocol, data = _split(connection_info, operation)
    conn = _connector(protocol, operation)
    try:
        device_info = conn.connect_volume(secrets.revealed(data))
    except Exception as exc:
        raise _failure(operation, protocol, data, exc) from exc
    path = device_info.get("path") if isinstance(device_info, Mapping) else None
    if not isinstance(path, str) or not path:  # the connection info names no device: not ours to retry
        raise errors.FailedPrecondition(
            f"{operation} of {protocol} volume{_target(data)} returned no device path "
            f"(os-brick gave {type(path).__name__}); this protocol cannot give the node a block device"
        )
    return _json_copy(device_info)


def attached_device(connection_info: Mapping[str, Any], device_info: Mapping[str, Any]) -> str:
    """The device path :func:`attach` returned, after checking that it is the device the connection
    describes where the connection names one (``local``: its ``device_path``; other protocols' connectors
    find the device from the target themselves). FailedPrecondition when they differ."""
    path = str(device_info.get("path") or "")
    data = connection_info.get("data") or {}
    named = secrets.revealed(data.get("device_path")) if connection_info.get(PROTOCOL_KEY) == "local" else None
    if named is not None and os.path.realpath(str(named)) != os.path.realpath(path):
        raise errors.FailedPrecondition(f"os-brick attached {path}, not the device {named} the connection names")
    return path


def detach(connection_info: Mapping[str, Any], device_info: Mapping[str, Any] | None) -> None:
    """Disconnect the volume from this host (os-brick's ``disconnect_volume``) using the attach's ``device_info``.

    Secrets are not needed: pass the stored, secret-free connection info.
    """
    _ensure_setup()
    operation = "detach"
    protocol, data = _split(connection_info, operation)
    conn = _connector(protocol, operation)
    info = copy.deepcopy(dict(device_info)) if device_info is not None else None
    try:
        conn.disconnect_volume(secrets.revealed(data), info)
    except Exception as exc:
        raise _failure(operation, protocol, data, exc) from exc


def extend(connection_info: Mapping[str, Any]) -> int | None:
    """Make the host see the attached volume's new size; the size in bytes, None if the connector can't.

    For ``local`` os-brick 7 returns the device's current size (``blockdev --getsize64``): a loop device
    must have been refreshed (``losetup -c``) by whoever grew its file.
    """
    _ensure_setup()
    operation = "extend"
    protocol, data = _split(connection_info, operation)
    conn = _connector(protocol, operation)
    try:
        size = conn.extend_volume(secrets.revealed(data))
    except NotImplementedError:
        return None
    except Exception as exc:
        raise _failure(operation, protocol, data, exc) from exc
    return int(size) if size is not None else None


def _json_copy(value: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of what os-brick returned that JSON can hold (anything else as its ``str``)."""
    copied: dict[str, Any] = json.loads(json.dumps(value, default=str))
    return copied


def _secret_values(value: Any, secret: bool = False) -> list[str]:
    """Every string of a secret entry (:func:`mbs_csi.secrets.is_secret`), at any depth, revealed."""
    if isinstance(value, secrets.Secret):
        value, secret = value.reveal(), True
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in _secret_values(v, secret or secrets.is_secret(str(k), v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _secret_values(v, secret)]
    return [value] if secret and isinstance(value, str) and value else []


def _target(data: Mapping[str, Any]) -> str:
    parts = []
    for key in _SAFE_KEYS:
        value = data.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            parts.append(f"{key}={value}")
    return secrets.scrub(f" ({', '.join(parts)})") if parts else ""


def _detail(exc: BaseException, data: Mapping[str, Any]) -> str:
    """``Type: message`` of an os-brick exception on one line, with any secret of ``data`` masked."""
    from oslo_utils import strutils

    text = " ".join(str(exc).split())
    for value in sorted(_secret_values(data), key=len, reverse=True):
        text = text.replace(value, secrets.MASK)
    text = secrets.scrub(strutils.mask_password(text))
    if len(text) > _DETAIL_LIMIT:
        text = text[: _DETAIL_LIMIT - 3] + "..."
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


_HINTS = (
    (re.compile(r"No such file or directory: '(\w[\w.-]*)'"), "is the {0} tool installed on the node?"),
    (re.compile(r"lock_path"), "call setup_privileges() with a lock directory"),
)


# What to check on the node when os-brick's connector ran but no device appeared.
_NO_DEVICE_HINTS = {
    "iscsi": "is iscsid running on this node, and can it log in to the portal? see iscsiadm -m session",
    "fibre_channel": "are the node's HBAs zoned to the array? see /sys/class/fc_host",
    "nvmeof": "are the nvme-fabrics modules loaded and the target reachable? see nvme list-subsys",
}


def _failure(operation: str, protocol: str, data: Mapping[str, Any], exc: BaseException) -> BrickError:
    detail = _detail(exc, data)
    hints = [hint.format(*m.groups()) for pattern, hint in _HINTS if (m := pattern.search(detail))]
    if type(exc).__name__ == "VolumeDeviceNotFound" and protocol.lower() in _NO_DEVICE_HINTS:
        hints.append(_NO_DEVICE_HINTS[protocol.lower()])
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        hints.append(f"the connection data has no {exc.args[0]!r}: check what the backend's driver returns")
    suffix = f" ({'; '.join(hints)})" if hints else ""
    return BrickError(
        f"{operation} failed for {protocol} volume{_target(data)}: {detail}{suffix}",
        operation=operation,
        protocol=protocol,
    )
