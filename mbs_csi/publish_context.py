"""Connection info <-> CSI ``publish_context``, with secrets kept out.

Kubernetes stores ``publish_context`` in plain VolumeAttachment objects, so the controller withholds
every secret entry of the backend's connection info (:func:`mbs_csi.secrets.is_secret`: keyrings, CHAP
passwords, tokens, any value holding a configured sensitive option) and names the withheld keys; the
node fills them back from its node-stage secrets, as :class:`~mbs_csi.secrets.Secret` values. Values
that are not strings travel JSON-encoded, and are listed too, so the node rebuilds exactly what the
backend returned.
"""

from __future__ import annotations

import json
from typing import Any

from mbs_csi import errors, secrets

PROTOCOL_KEY = "driver_volume_type"
JSON_KEYS = "mbs.json_keys"
SECRET_KEYS = "mbs.secret_keys"
WITHHELD = "mbs.withheld"  # the value kept in the controller's database for a withheld entry


def _withheld(key: str, value: Any) -> bool:
    return value == WITHHELD or secrets.is_secret(key, value) or secrets.holds_secret(value)


def withhold_secrets(connection_info: dict[str, Any]) -> dict[str, Any]:
    """``connection_info`` with every entry :func:`to_publish_context` withholds set to ``WITHHELD``: what
    the controller's database keeps, so that a publish answered from it withholds the same keys."""
    data = connection_info.get("data") or {}
    return {**connection_info, "data": {key: WITHHELD if _withheld(key, v) else v for key, v in data.items()}}


def to_publish_context(connection_info: dict[str, Any]) -> dict[str, str]:
    context = {PROTOCOL_KEY: str(connection_info.get(PROTOCOL_KEY, ""))}
    encoded, withheld = [], []
    for key, value in (connection_info.get("data") or {}).items():
        if _withheld(key, value):
            withheld.append(key)
        elif isinstance(value, str):
            context[key] = value
        else:
            context[key] = json.dumps(value, sort_keys=True)
            encoded.append(key)
    if encoded:
        context[JSON_KEYS] = ",".join(sorted(encoded))
    if withheld:
        context[SECRET_KEYS] = ",".join(sorted(withheld))
    return context


def from_publish_context(context: dict[str, str], stage_secrets: dict[str, str]) -> dict[str, Any]:
    """The connection info again; withheld keys come from ``stage_secrets`` (KeyError names one missing),
    each as a :class:`~mbs_csi.secrets.Secret`: whatever its name, it is never stored nor logged.
    InvalidArgument when the protocol is missing or a value listed as JSON is not."""
    if not context.get(PROTOCOL_KEY):
        raise errors.InvalidArgument(f"publish_context has no {PROTOCOL_KEY!r}: was it made by this driver?")
    encoded = set(filter(None, context.get(JSON_KEYS, "").split(",")))
    withheld = list(filter(None, context.get(SECRET_KEYS, "").split(",")))
    data: dict[str, Any] = {}
    for key, value in context.items():
        if key in (PROTOCOL_KEY, JSON_KEYS, SECRET_KEYS):
            continue
        try:
            data[key] = json.loads(value) if key in encoded else value
        except ValueError:
            raise errors.InvalidArgument(f"publish_context[{key!r}] is listed in {JSON_KEYS} but is not JSON") from None
    for key in withheld:
        data[key] = secrets.Secret(stage_secrets[key])
    return {PROTOCOL_KEY: context.get(PROTOCOL_KEY, ""), "data": data}
