"""The interceptor and the one error table, through a real gRPC server and client in this process.

The servicer here is a test stand-in for a handler (the real Controller arrives with its own issue):
each RPC raises one kind of error so the mapping can be checked end to end over a real socket.
"""

from __future__ import annotations

import logging
import shutil
from concurrent import futures

import grpc
import pytest

from csi import csi_pb2, csi_pb2_grpc
from mbs_csi import errors, secrets
from mbs_csi.interceptor import RpcInterceptor, describe_ids, redacted, to_status
from testkit.host import short_tmpdir

LEAKY = "leaky-pa55phrase"
secrets.register(LEAKY)


class RaisingController(csi_pb2_grpc.ControllerServicer):
    """Raises, from CreateVolume, the exception class named by the request's name."""

    def CreateVolume(self, request, context):
        if request.name == "boom":
            raise RuntimeError(f"driver blew up with password {LEAKY}")
        cls = getattr(errors, request.name)
        raise cls(f"{request.name} for volume {request.name}, secret {LEAKY}")


@pytest.fixture(scope="module")
def controller():
    workdir = short_tmpdir()
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[RpcInterceptor()])
    csi_pb2_grpc.add_ControllerServicer_to_server(RaisingController(), server)
    server.add_insecure_port(f"unix://{workdir}/csi.sock")
    server.start()
    channel = grpc.insecure_channel(f"unix://{workdir}/csi.sock")
    yield csi_pb2_grpc.ControllerStub(channel)
    channel.close()
    server.stop(0)
    shutil.rmtree(workdir, ignore_errors=True)


def call(stub, name: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateVolume(csi_pb2.CreateVolumeRequest(name=name))
    return caught.value


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT),
        ("NotFound", grpc.StatusCode.NOT_FOUND),
        ("AlreadyExists", grpc.StatusCode.ALREADY_EXISTS),
        ("OutOfRange", grpc.StatusCode.OUT_OF_RANGE),
        ("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION),
        ("Aborted", grpc.StatusCode.ABORTED),
        ("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("Unavailable", grpc.StatusCode.UNAVAILABLE),
        ("DeadlineExceeded", grpc.StatusCode.DEADLINE_EXCEEDED),
        ("Internal", grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_class_maps_to_its_status_with_its_message_scrubbed(controller, name, code):
    error = call(controller, name)
    assert error.code() == code
    assert error.details() == f"{name} for volume {name}, secret ***"


def test_an_unexpected_exception_is_internal_without_traceback_or_secret(controller, caplog):
    with caplog.at_level(logging.ERROR, logger="mbs_csi.rpc"):
        error = call(controller, "boom")
    assert error.code() == grpc.StatusCode.INTERNAL
    rid = dict(error.trailing_metadata())["x-request-id"]
    assert error.details() == f"unexpected RuntimeError in the driver; see its log for request id {rid}"
    assert "Traceback" in caplog.text  # the log keeps the traceback for the operator


def test_an_rpc_the_service_does_not_implement_is_unimplemented(controller):
    with pytest.raises(grpc.RpcError) as caught:
        controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v"))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_subclasses_inherit_their_parents_status():
    class VolumeBusy(errors.FailedPrecondition):
        pass

    assert to_status(VolumeBusy("busy"), "r")[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_redacted_masks_every_csi_secret_field_and_nothing_else():
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        parameters={"backend": "ceph"},
        secrets={"password": "p4ss", "key": "k3y"},
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="snap-1")
        ),
    )
    shown = redacted(request)
    assert dict(shown.secrets) == {"password": "***", "key": "***"}
    assert dict(shown.parameters) == {"backend": "ceph"}
    assert dict(request.secrets) == {"password": "p4ss", "key": "k3y"}  # the original is untouched
    stage = redacted(
        csi_pb2.NodeStageVolumeRequest(volume_id="v", secrets={"keyring": "AQBx"}, publish_context={"monitors": "m"})
    )
    assert dict(stage.secrets) == {"keyring": "***"} and dict(stage.publish_context) == {"monitors": "m"}


def test_describe_ids_names_what_the_call_is_about():
    assert describe_ids(csi_pb2.ControllerPublishVolumeRequest(volume_id="v1", node_id="n1")) == (
        " volume_id=v1 node_id=n1"
    )
    assert describe_ids(csi_pb2.ProbeRequest()) == ""


def test_secret_wrapper_and_scrubbing():
    value = secrets.Secret("wrapped-s3cret")
    assert str(value) == "***"
    assert repr(value) == "Secret('***')"
    assert f"{value}" == "***"
    assert value.reveal() == "wrapped-s3cret"
    assert secrets.scrub("x wrapped-s3cret y") == "x *** y"
    assert secrets.redact_url("postgresql://u:p@h:5/d") == "postgresql://u:***@h:5/d"
    assert secrets.redact_url("sqlite:////var/lib/x.sqlite") == "sqlite:////var/lib/x.sqlite"
    assert str(secrets.Secret("ab")) == "***"
    assert secrets.scrub("a b c") == "a b c"  # too short to scrub from free text


def test_every_error_class_the_driver_raises_has_a_status():
    """A CSIError subclass missing from the table would reach clients as 'unexpected ... in the driver'."""
    for cls in errors.CSIError.__subclasses__():
        code, message = to_status(cls("what went wrong"), "r")
        assert message == "what went wrong", cls
        assert code != grpc.StatusCode.UNKNOWN, cls
