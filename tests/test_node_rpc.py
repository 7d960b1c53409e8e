"""The Node service through gRPC and the driver's interceptor and log format, in this process: bad input
answers INVALID_ARGUMENT (never INTERNAL "unexpected ..."), a client's value cannot forge log lines,
and an ext4 filesystem that cannot grow online is a FAILED_PRECONDITION with one WARNING line."""

from __future__ import annotations

import io
import logging
import os
import subprocess
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc
from mbs_csi import capabilities, errors, logs
from mbs_csi.config import Settings
from mbs_csi.interceptor import RpcInterceptor
from mbs_csi.node import brick
from mbs_csi.node.service import NodeService
from mbs_csi.node.store import AttachmentStore
from testkit.csi_requests import block_cap, mount_cap
from testkit.host import CAP_SYS_RESOURCE, has_capability, short_tmpdir
from testkit.loop import NODE_IN_PROCESS, attach, detach, reread_capacity, sparse_file
from testkit.rpc import rpc_error

pytestmark = NODE_IN_PROCESS

MIB = 1024**2
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Node:
    stub: csi_pb2_grpc.NodeStub
    root: Path
    log: io.StringIO
    devices: list[str]

    def logged(self) -> list[str]:
        return self.log.getvalue().splitlines()


@pytest.fixture
def node() -> Iterator[Node]:
    root = short_tmpdir("mbs-node-rpc-")
    brick.setup_privileges(lock_path=str(root / "locks"))
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logs.ScrubbingFormatter(logs.FORMAT))
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)
    store = AttachmentStore.in_state_dir(root / "state")
    settings = cast(Settings, SimpleNamespace(node_id="node-rpc", topology={}, max_volumes_per_node=0))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[RpcInterceptor()])
    csi_pb2_grpc.add_NodeServicer_to_server(NodeService(settings, store), server)
    socket = root / "csi.sock"
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    channel = grpc.insecure_channel(f"unix://{socket}")
    made = Node(csi_pb2_grpc.NodeStub(channel), root, log, [])
    try:
        yield made
    finally:
        channel.close()
        server.stop(None).wait()
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            if line.split()[4].startswith(f"{root}/"):
                subprocess.run(["umount", "-l", line.split()[4]], check=False, timeout=60)
        for device in made.devices:
            detach(device)
        store.close()
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False, timeout=60)


def staged(node: Node, name: str, cap: pb.VolumeCapability, size: int = 64 * MIB) -> tuple[str, str]:
    """A volume staged at ``<root>/staging-<name>``: (its loop device, its staging path)."""
    device = attach(sparse_file(node.root / f"{name}.img", size))
    node.devices.append(device)
    staging = str(node.root / f"staging-{name}")
    node.stub.NodeStageVolume(
        pb.NodeStageVolumeRequest(
            volume_id=name,
            staging_target_path=staging,
            volume_capability=cap,
            publish_context={"driver_volume_type": "local", "device_path": device},
        )
    )
    return device, staging


def with_mode(cap: pb.VolumeCapability, mode: int) -> pb.VolumeCapability:
    changed = pb.VolumeCapability()
    changed.CopyFrom(cap)
    changed.access_mode.mode = mode
    return changed


@pytest.mark.parametrize("mode", [-1, 8, 9])
def test_an_access_mode_the_spec_does_not_define_is_an_invalid_argument(mode: int) -> None:
    """What CreateVolume, GetCapacity, ValidateVolumeCapabilities and the node all check with."""
    for cap in (mount_cap(), block_cap()):
        with pytest.raises(errors.InvalidArgument, match=f"access_mode.mode {mode} is not an access mode"):
            capabilities.access([with_mode(cap, mode)], multiattach=True)


def test_bad_input_is_an_invalid_argument_not_an_internal_error(node: Node) -> None:
    _, staging = staged(node, "vol", mount_cap("ext4"))
    pod = node.root / "pod"
    pod.mkdir()
    target = str(pod / "volume")

    def publish(**fields: object) -> pb.NodePublishVolumeRequest:
        request = pb.NodePublishVolumeRequest(
            volume_id="vol", staging_target_path=staging, target_path=target, volume_capability=mount_cap("ext4")
        )
        for name, value in fields.items():
            if name == "volume_mount_group":
                request.volume_capability.mount.volume_mount_group = str(value)
            elif name == "mode":
                request.volume_capability.access_mode.mode = int(cast(int, value))
            else:
                setattr(request, name, value)
        return request

    long_component = str(pod / ("x" * 256))
    bad = [
        (node.stub.NodePublishVolume, publish(target_path=f"{pod}/nul\0byte")),
        (node.stub.NodePublishVolume, publish(staging_target_path=f"{staging}\0")),
        (node.stub.NodePublishVolume, publish(target_path="relative/volume")),
        (node.stub.NodePublishVolume, publish(volume_mount_group="99999999999")),
        (node.stub.NodePublishVolume, publish(volume_mount_group="-5")),
        (node.stub.NodePublishVolume, publish(mode=9)),
        (node.stub.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id="vol", target_path=f"{pod}/a\0b")),
        (node.stub.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id="vol", target_path=long_component)),
        (node.stub.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id="vol", volume_path=f"{staging}\0")),
        (node.stub.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id="vol", volume_path=f"{staging}\0x")),
        (
            node.stub.NodeStageVolume,
            pb.NodeStageVolumeRequest(
                volume_id="other",
                staging_target_path=str(node.root / "staging-other"),
                volume_capability=mount_cap("ext4"),
                publish_context={
                    "driver_volume_type": "local",
                    "device_path": "/dev/null",
                    "mbs.json_keys": "device_path",
                },
            ),
        ),
        (
            node.stub.NodeStageVolume,
            pb.NodeStageVolumeRequest(
                volume_id="other",
                staging_target_path=str(node.root / "staging-other"),
                volume_capability=with_mode(block_cap(), -1),
                publish_context={"driver_volume_type": "local", "device_path": "/dev/null"},
            ),
        ),
    ]
    for method, request in bad:
        error = rpc_error(method, request)
        assert error.code() == INVALID, (request, error.details())
        assert "unexpected" not in error.details()
    assert not os.path.lexists(target)
    assert "Traceback" not in node.log.getvalue()


def test_a_newline_in_a_client_value_cannot_forge_a_log_line(node: Node) -> None:
    forged = "2026-01-01 00:00:00,000 INFO mbs_csi.rpc: NodeUnstageVolume done volume_id=victim status=OK"
    for _ in range(3):
        node.stub.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=f"evil\n{forged}\r\n{forged}", target_path="/nonexistent")
        )
        rpc_error(
            node.stub.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id=f"x\n{forged}", volume_path="/y")
        )
    lines = node.logged()
    assert lines and not any(line.startswith(forged[:20]) for line in lines), lines
    assert all(line[:4].isdigit() for line in lines), lines  # every line is one the formatter began


@pytest.mark.skipif(has_capability(CAP_SYS_RESOURCE), reason="this process can grow ext4 online")
def test_ext4_that_cannot_grow_online_is_a_failed_precondition_with_one_warning(node: Node) -> None:
    device, staging = staged(node, "grow", mount_cap("ext4"))
    with open(node.root / "grow.img", "r+b") as f:
        f.truncate(128 * MIB)
    reread_capacity(device)
    request = pb.NodeExpandVolumeRequest(volume_id="grow", volume_path=staging)
    before = len(node.logged())
    for _ in range(2):  # each kubelet retry the same
        error = rpc_error(node.stub.NodeExpandVolume, request)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "CAP_SYS_RESOURCE" in error.details()
    lines = node.logged()[before:]
    assert "Traceback" not in "\n".join(lines) and not any(" ERROR " in line for line in lines), lines
    assert sum(" WARNING " in line for line in lines) == 2, lines


def test_whatever_came_from_the_secrets_map_is_never_stored_nor_logged(node: Node) -> None:
    """A node-stage secret is secret whatever its key: here ``device_path``, named in mbs.secret_keys."""
    device = attach(sparse_file(node.root / "secret.img", 64 * MIB))
    node.devices.append(device)
    secret = node.root / "device-path-given-as-a-secret-0x5eC4e7"
    secret.symlink_to(device)
    logging.getLogger().setLevel(logging.DEBUG)
    for _ in range(2):
        node.stub.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id="secret",
                staging_target_path=str(node.root / "staging-secret"),
                volume_capability=block_cap(),
                publish_context={"driver_volume_type": "local", "mbs.secret_keys": "device_path"},
                secrets={"device_path": str(secret)},
            )
        )
    log = node.log.getvalue()
    stored = b"".join(p.read_bytes() for p in (node.root / "state").iterdir())
    assert "NodeStageVolume done" in log and b"secret" in stored  # both were written...
    assert str(secret) not in log and str(secret).encode() not in stored  # ...without the secret
    node.stub.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id="secret", staging_target_path=str(node.root / "staging-secret"))
    )


# --- every node RPC, any input: documented codes only --------------------------------------------------

# The codes the CSI spec documents for the node RPCs (and INTERNAL only with a message of ours).
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ABORTED,
}
texts = st.text(st.characters(codec="utf-8"), max_size=40)


def capabilities_() -> st.SearchStrategy[pb.VolumeCapability]:
    access_modes = st.builds(pb.VolumeCapability.AccessMode, mode=st.integers(-2, 10))
    groups = st.one_of(st.just(""), texts, st.integers(-5, 2**40).map(str))
    fs_types = st.sampled_from(["", "ext4", "xfs", "vfat", "ext4\n"])
    mount = st.builds(pb.VolumeCapability.MountVolume, fs_type=fs_types, volume_mount_group=groups)
    return st.one_of(
        st.builds(pb.VolumeCapability, mount=mount, access_mode=access_modes),
        st.builds(pb.VolumeCapability, block=st.just(pb.VolumeCapability.BlockVolume()), access_mode=access_modes),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_node_request_answers_a_documented_code_without_a_traceback(node: Node, data: st.DataObject) -> None:
    ids = st.one_of(texts, st.just("vol"))
    # Paths inside this test's directory (and a few that exist everywhere): a bug must not reach further.
    paths = st.one_of(texts, texts.map(lambda t: f"{node.root}/{t}"), st.sampled_from(["/", "/dev/null", "/tmp"]))
    contexts = st.fixed_dictionaries(
        {"driver_volume_type": st.sampled_from(["local", "nonsense", ""]), "device_path": paths},
        optional={"mbs.json_keys": st.sampled_from(["device_path", "x"]), "mbs.secret_keys": st.just("k")},
    )
    requests = [
        (
            node.stub.NodeStageVolume,
            st.builds(
                pb.NodeStageVolumeRequest,
                volume_id=ids,
                staging_target_path=paths,
                volume_capability=capabilities_(),
                publish_context=contexts,
                secrets=st.dictionaries(texts, texts, max_size=2),
            ),
        ),
        (node.stub.NodeUnstageVolume, st.builds(pb.NodeUnstageVolumeRequest, volume_id=ids, staging_target_path=paths)),
        (
            node.stub.NodePublishVolume,
            st.builds(
                pb.NodePublishVolumeRequest,
                volume_id=ids,
                staging_target_path=paths,
                target_path=paths,
                volume_capability=capabilities_(),
                readonly=st.booleans(),
            ),
        ),
        (node.stub.NodeUnpublishVolume, st.builds(pb.NodeUnpublishVolumeRequest, volume_id=ids, target_path=paths)),
        (node.stub.NodeGetVolumeStats, st.builds(pb.NodeGetVolumeStatsRequest, volume_id=ids, volume_path=paths)),
        (node.stub.NodeExpandVolume, st.builds(pb.NodeExpandVolumeRequest, volume_id=ids, volume_path=paths)),
    ]
    for method, strategy in requests:
        request = data.draw(strategy)
        try:
            method(request)
        except grpc.RpcError as error:
            assert error.code() in DOCUMENTED, (request, error.code(), error.details())
            assert "Traceback" not in error.details() and "unexpected" not in error.details(), error.details()
    assert "Traceback" not in node.log.getvalue()
