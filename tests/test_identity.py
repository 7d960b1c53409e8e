"""Identity RPCs through a real client on the driver's real unix socket."""

from __future__ import annotations

import grpc
import pytest

import mbs_csi
from csi import csi_pb2, csi_pb2_grpc
from testkit.driver import running_driver

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion


def capabilities(driver) -> set[tuple[str, int]]:
    response = driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    return {(cap.WhichOneof("type"), getattr(cap, cap.WhichOneof("type")).type) for cap in response.capabilities}


def test_plugin_info_names_the_driver_and_its_version():
    with running_driver("--role", "node") as driver:
        info = driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "mbs.csi.io"
    assert info.vendor_version == mbs_csi.__version__ != "0+unknown"
    assert dict(info.manifest) == {"role": "node"}


def test_driver_name_is_configurable():
    with running_driver("--role", "node", "--driver-name", "block.example.com") as driver:
        assert driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name == "block.example.com"


@pytest.mark.parametrize(("role", "controller"), [("controller", True), ("node", False), ("all", True)])
def test_capabilities_follow_the_role(role, controller):
    with running_driver("--role", role) as driver:
        caps = capabilities(driver)
    assert (("service", Service.CONTROLLER_SERVICE) in caps) is controller
    assert ("volume_expansion", Expansion.ONLINE) in caps
    assert ("service", Service.VOLUME_ACCESSIBILITY_CONSTRAINTS) not in caps


def test_topology_adds_accessibility_constraints():
    with running_driver("--role", "node", "--topology", "topology.mbs.csi.io/zone=a") as driver:
        assert ("service", Service.VOLUME_ACCESSIBILITY_CONSTRAINTS) in capabilities(driver)


def test_probe_is_ready_on_the_embedded_default():
    with running_driver() as driver:
        driver.wait_ready()  # once a backend worker is up


def test_every_call_carries_a_request_id_that_the_log_shows():
    with running_driver("--role", "node") as driver:
        _, call = driver.identity.Probe.with_call(csi_pb2.ProbeRequest())
        rid = dict(call.trailing_metadata())["x-request-id"]
        log = driver.log()
    assert len(rid) == 16
    assert f"[{rid}]" in log
    assert "Probe called" in log and "Probe done status=OK in" in log


def test_services_a_role_does_not_serve_answer_unimplemented():
    with running_driver("--role", "node") as driver:
        stub = csi_pb2_grpc.ControllerStub(driver.channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
