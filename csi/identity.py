"""CSI Identity service: name, version, capabilities and readiness of this process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

import zvolt
from csi import DRIVER_NAME
from zvolt.pb import csi_pb2, csi_pb2_grpc

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion


def plugin_capabilities() -> list[csi_pb2.PluginCapability]:
    """The plugin's capabilities: the same from every instance, whatever its --mode (the CSI spec:
    all instances of one plugin version return the same set; a CO may ask either of them)."""
    return [
        csi_pb2.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)),
        csi_pb2.PluginCapability(service=Service(type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
        csi_pb2.PluginCapability(service=Service(type=Service.GROUP_CONTROLLER_SERVICE)),
        csi_pb2.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)),
    ]


class IdentityService(csi_pb2_grpc.IdentityServicer):  # type: ignore[misc]
    """`controller` only names this instance's mode in GetPluginInfo's manifest; readiness is the
    instance's own; the capabilities are the plugin's, the same in both modes."""

    def __init__(self, controller: bool, ready: Callable[[], bool]) -> None:
        self.controller = controller
        self.ready = ready

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext) -> Any:
        return csi_pb2.GetPluginInfoResponse(
            name=DRIVER_NAME,
            vendor_version=zvolt.__version__,
            manifest={"mode": "controller" if self.controller else "node"},
        )

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> Any:
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=plugin_capabilities())

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> Any:
        resp = csi_pb2.ProbeResponse()
        resp.ready.value = self.ready()
        return resp
