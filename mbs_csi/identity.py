"""CSI Identity service: who the plugin is, what it offers, and whether it is ready."""

from __future__ import annotations

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi import csi_pb2, csi_pb2_grpc
from mbs_csi import __version__
from mbs_csi.config import Settings
from mbs_csi.health import Readiness

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


def plugin_capabilities(settings: Settings) -> list[csi_pb2.PluginCapability]:
    caps = []
    if settings.runs_controller:
        caps.append(csi_pb2.PluginCapability(service=_Service(type=_Service.CONTROLLER_SERVICE)))
        caps.append(csi_pb2.PluginCapability(service=_Service(type=_Service.GROUP_CONTROLLER_SERVICE)))
    if settings.has_topology:
        caps.append(csi_pb2.PluginCapability(service=_Service(type=_Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)))
    caps.append(csi_pb2.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)))
    return caps


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, settings: Settings, readiness: Readiness) -> None:
        self._info = csi_pb2.GetPluginInfoResponse(
            name=settings.driver_name, vendor_version=__version__, manifest={"role": settings.role}
        )
        self._capabilities = csi_pb2.GetPluginCapabilitiesResponse(capabilities=plugin_capabilities(settings))
        self._readiness = readiness

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return self._info

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        return self._capabilities

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=BoolValue(value=not self._readiness.problems()))
