"""Mutable parameters (CSI's ``mutable_parameters``; Kubernetes' VolumeAttributesClass): which keys a
backend accepts, how they are checked, and how they map onto Cinder's model.

Cinder describes what a volume may change in its volume type: QoS specs (``total_iops_sec``,
``read_bytes_sec``...) and extra specs (anything else a driver reads, such as ``replication_enabled``).
A key named like one of Cinder's QoS specs is a QoS spec, with a whole number as its value; every other
key is an extra spec, passed to the driver as it is.

Each backend accepts the keys of its ``mutable_parameters`` list (config); a backend that does not set it
accepts the QoS limits its driver is known to apply (:data:`DRIVER_DEFAULTS`), or nothing.

Plain Python: the config, the gRPC front and the backend workers all use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from mbs_csi import errors

# Cinder's QoS spec names: the limits, their bursts (``_max``) and per-GiB forms, and ``size_iops_sec``.
_QOS_KEY = re.compile(r"^((total|read|write)_(iops|bytes)_sec(_max|_per_gb|_per_gb_min)?|size_iops_sec)$")

# The six QoS limits: what Cinder's RBD driver turns into librbd's per-image ``rbd_qos_*_limit`` settings,
# and what the loopback driver records.
QOS_LIMITS = (
    "total_iops_sec",
    "read_iops_sec",
    "write_iops_sec",
    "total_bytes_sec",
    "read_bytes_sec",
    "write_bytes_sec",
)

# volume_driver -> the keys its backends accept when their config lists none.
DRIVER_DEFAULTS: Mapping[str, tuple[str, ...]] = {
    "cinder.volume.drivers.rbd.RBDDriver": QOS_LIMITS,
    "mbs_csi.drivers.loopback.LoopbackDriver": QOS_LIMITS,
}


def default_for(volume_driver: str) -> tuple[str, ...]:
    """The keys a backend of ``volume_driver`` accepts unless its config says otherwise."""
    return DRIVER_DEFAULTS.get(volume_driver, ())


def is_qos(key: str) -> bool:
    return bool(_QOS_KEY.match(key))


def check(backend: str, accepted: Sequence[str], parameters: Mapping[str, str]) -> None:
    """Refuse (InvalidArgument, naming them) keys ``backend`` does not accept and QoS values that are not
    whole numbers."""
    refused = sorted(k for k in parameters if k not in accepted)
    if refused:
        allowed = ", ".join(accepted) if accepted else "none (set mutable_parameters in its config)"
        raise errors.InvalidArgument(
            f"mutable parameter(s) {', '.join(refused)} cannot be applied on backend {backend}; it accepts: {allowed}"
        )
    bad = sorted(k for k, v in parameters.items() if is_qos(k) and not (v.isascii() and v.isdigit()))
    if bad:
        raise errors.InvalidArgument(f"mutable parameter(s) {', '.join(bad)} must be a whole number >= 0")


def split(parameters: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(QoS specs, extra specs) of a volume type with ``parameters``."""
    qos = {k: v for k, v in parameters.items() if is_qos(k)}
    return qos, {k: v for k, v in parameters.items() if k not in qos}
