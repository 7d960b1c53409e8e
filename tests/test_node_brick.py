"""The os-brick adapter against real os-brick 7 and real loop devices (LOCAL is the connector that can
attach on this machine; the iSCSI connector runs for real too, and fails because there is no iscsiadm).

os-brick runs **in this pytest process**, as it will in the node plugin. What it changes is process-global
but used by nothing else here: options registered/overridden on oslo.config's global ``cfg.CONF``
(groups ``os_brick`` and ``privsep_osbrick``), the client mode of os-brick's two privsep contexts, and an
``eventlet`` import that patches nothing. cinderlib, the other oslo user, only ever runs in child
processes. The helper-daemon privsep mode, which starts a daemon and flips those globals the other way,
and the check that os-brick is imported lazily, which needs a fresh interpreter, run in child processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mbs_csi import logs
from mbs_csi.interceptor import to_status
from mbs_csi.node import brick
from testkit import loop
from testkit.child import run_python_json

MIB = 1024 * 1024

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("losetup") is None, reason="needs root and losetup for real loop devices"
    ),
    # oslo's eventlet-era modules warn that they are deprecated when os-brick loads them, and eventlet
    # (imported, never patching) warns on every fork: each command os-brick runs.
    pytest.mark.filterwarnings("ignore:Using fork:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:oslo_utils.eventletutils"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:oslo_service.eventlet_backdoor"),
]


@pytest.fixture(scope="module", autouse=True)
def privileges(tmp_path_factory: pytest.TempPathFactory) -> None:
    brick.setup_privileges(lock_path=str(tmp_path_factory.mktemp("brick-locks")))


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "volume.img"
    with loop.loop_device(backing, 64 * MIB) as device:
        yield device, backing


def local(device: str, protocol: str = "local") -> dict:
    return {"driver_volume_type": protocol, "data": {"device_path": device, "volume_id": "vol-1"}}


def test_connector_properties_name_the_node_and_are_json():
    props = brick.connector_properties("node-7")
    assert json.loads(json.dumps(props)) == props
    assert props["host"] == "node-7"
    assert props["multipath"] is False
    assert props["os_type"] == "linux" and props["platform"]
    assert isinstance(props["ip"], str) and props["ip"]
    # No iscsid here: os-brick leaves the key out rather than failing.
    assert ("initiator" in props) == Path("/etc/iscsi/initiatorname.iscsi").exists()
    # With the nvme CLI installed os-brick creates /etc/nvme/hostnqn if missing; without it, no key.
    if "nqn" in props:
        assert props["nqn"] == Path("/etc/nvme/hostnqn").read_text().strip()
    else:
        assert shutil.which("nvme") is None


def test_attach_local_gives_the_device_and_detach_leaves_it_alone(loop_device: tuple[str, Path]):
    device, _ = loop_device
    info = brick.attach(local(device))
    assert info == {"type": "local", "path": device}
    assert Path(info["path"]).is_block_device()
    assert brick.attach(local(device, "LOCAL")) == info  # protocol names are case-insensitive; attach repeats
    assert brick.detach(local(device), info) is None
    assert brick.detach(local(device), None) is None  # without the attach's device info too
    assert Path(device).is_block_device()  # LOCAL disconnect is a no-op: the loop device belongs to the backend


def test_extend_local_reports_the_device_size_in_bytes(loop_device: tuple[str, Path]):
    device, backing = loop_device
    assert brick.extend(local(device)) == 64 * MIB
    with open(backing, "r+b") as f:
        f.truncate(96 * MIB)
    loop.reread_capacity(device)
    assert brick.extend(local(device)) == 96 * MIB


def test_extend_is_none_when_the_connector_cannot():
    # os-brick's VMDK connector raises NotImplementedError from extend_volume (LOCAL does not, see above).
    assert brick.extend({"driver_volume_type": "vmdk", "data": {"volume_id": "vol-1"}}) is None


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(brick.BrickError) as caught:
        brick.attach({"driver_volume_type": "frobnicate", "data": {"volume_id": "vol-1"}})
    message = str(caught.value)
    assert "'frobnicate'" in message and "no connector" in message
    for known in ("ISCSI", "LOCAL", "NVMEOF", "RBD"):  # lists what would work
        assert known in message
    assert isinstance(caught.value, brick.UnknownProtocol)
    assert to_status(caught.value, "r")[0].name == "FAILED_PRECONDITION"


@pytest.mark.parametrize(
    ("info", "needle"),
    [({"data": {}}, "driver_volume_type"), ({"driver_volume_type": "local"}, "'data'"), ("nonsense", "protocol")],
)
def test_malformed_connection_info_is_a_clear_error(info: object, needle: str):
    with pytest.raises(brick.BrickError, match=needle):
        brick.attach(info)  # type: ignore[arg-type]


def test_a_missing_key_is_named():
    with pytest.raises(brick.BrickError, match="no device_path"):
        brick.attach({"driver_volume_type": "local", "data": {}})  # os-brick's own ValueError
    with pytest.raises(brick.BrickError, match="the connection data has no 'device_path'"):
        brick.extend({"driver_volume_type": "gpfs", "data": {}})  # a bare KeyError inside os-brick


@pytest.fixture
def iscsi_node_records():
    """os-brick writes an iSCSI node record (open-iscsi's own config) before logging in: remove it after."""
    yield
    if shutil.which("iscsiadm"):
        subprocess.run(
            [
                "iscsiadm",
                "-m",
                "node",
                "-T",
                "iqn.2010-10.org.openstack:volume-1",
                "-p",
                "127.0.0.1:3260",
                "-o",
                "delete",
            ],
            capture_output=True,
        )


@pytest.mark.slow
def test_a_failing_iscsi_attach_is_bounded_and_its_message_holds_no_secret(
    caplog: pytest.LogCaptureFixture, iscsi_node_records
):
    password, discovery = "chap-Pa55w0rd-node-brick", "discovery-Pa55w0rd-node-brick"
    info = {
        "driver_volume_type": "iscsi",
        "data": {
            "target_portal": "127.0.0.1:3260",
            "target_iqn": "iqn.2010-10.org.openstack:volume-1",
            "target_lun": 1,
            "volume_id": "vol-1",
            "auth_method": "CHAP",
            "auth_username": "chap-user",
            "auth_password": password,
            "discovery_auth_method": "CHAP",
            "discovery_auth_username": "chap-user",
            "discovery_auth_password": discovery,
        },
    }
    caplog.set_level(logging.DEBUG)
    started = time.perf_counter()
    with pytest.raises(brick.BrickError) as caught:
        brick.attach(info)
    # With open-iscsi installed and no iscsid running, os-brick retries the portal login with backoff
    # (about 12 s here, mostly sleeping); it must still give up well before a kubelet's 2 min timeout.
    assert time.perf_counter() - started < 60
    message = str(caught.value)
    assert "attach failed for iscsi volume" in message and "target_portal=127.0.0.1:3260" in message
    assert "iscsiadm" in message  # what to fix on this node
    assert password not in message and discovery not in message
    assert caught.value.protocol == "iscsi" and caught.value.operation == "attach"
    # os-brick logs the connection properties and its tracebacks; the driver's formatter masks the secrets.
    formatter = logs.ScrubbingFormatter(logs.FORMAT)
    text = "\n".join(formatter.format(record) for record in caplog.records)
    assert "iscsiadm" in text
    assert password not in text and discovery not in text


def run_child(code: str) -> dict:
    return run_python_json("-c", textwrap.dedent(code), timeout=120)


def test_privsep_through_the_venv_helper_daemon(loop_device: tuple[str, Path], tmp_path: Path):
    device, _ = loop_device
    helper = Path(sys.prefix) / "bin" / "privsep-helper"
    result = run_child(
        f"""
        import json, os_brick.privileged as p
        from mbs_csi.node import brick
        brick.setup_privileges({str(helper)!r}, lock_path={str(tmp_path / "locks")!r})
        size = brick.extend({{"driver_volume_type": "local", "data": {{"device_path": {device!r}}}}})
        daemon = p.default.channel is not None and p.default.client_mode
        brick.setup_privileges(lock_path={str(tmp_path / "locks")!r})  # back to in-process: the daemon stops
        print(json.dumps({{"size": size, "daemon": daemon, "after": p.default.channel is None}}))
        """
    )
    assert result == {"size": 64 * MIB, "daemon": True, "after": True}


def test_node_role_never_imports_cinder_and_imports_os_brick_only_when_used():
    """The start-up figures (import times, RSS, first connector properties) are bench/node.py's."""
    result = run_child(
        """
        import json, sys
        from mbs_csi.node import brick
        lazy = not {"os_brick", "eventlet"} & set(sys.modules)
        brick.connector_properties("node-1")
        print(json.dumps({"lazy": lazy, "used": "os_brick" in sys.modules,
                          "cinder": sorted(m for m in sys.modules if m.split(".")[0] in ("cinder", "cinderlib"))}))
        """
    )
    assert result == {"lazy": True, "used": True, "cinder": []}
