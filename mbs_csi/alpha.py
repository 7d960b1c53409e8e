"""Which capabilities the CSI spec marks alpha, and whether to advertise them (``alpha_capabilities``).

The spec marks an experimental enum value with the option ``alpha_enum_value``; the generated stubs carry
it, so the list is read from ``csi.proto`` itself rather than written out here. Sidecars built on
csi-lib-utils < v0.21 (csi-provisioner v5.2.0 among them) stop on a capability they do not know, such as
GET_SNAPSHOT, and csi-sanity v5.4.0 fails its capability spec on it: with ``alpha_capabilities: false``
the driver keeps serving the alpha calls but no longer lists their capabilities.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from csi import csi_pb2

V = TypeVar("V", bound=int)


def is_alpha(enum: EnumTypeWrapper, value: int) -> bool:
    """Whether ``value`` of ``enum`` is marked alpha in the spec."""
    options = enum.DESCRIPTOR.values_by_number[value].GetOptions()
    return bool(options.Extensions[csi_pb2.alpha_enum_value])


def advertised(enum: EnumTypeWrapper, values: Iterable[V], alpha: bool) -> list[V]:
    """``values`` of ``enum`` to advertise: all of them, or (``alpha`` false) those the spec calls stable."""
    return [v for v in values if alpha or not is_alpha(enum, v)]
