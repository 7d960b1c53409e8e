"""Node benchmark: how fast and small each role starts, what os-brick adds when the node first uses it,
and what NodeStage/NodePublish/NodeUnpublish/NodeUnstage cost on a loop device against the same steps
done with raw commands, in the same run.

    .venv/bin/python -m bench.node [--runs 5] [--cycles 20] [--json out.json]

Targets (issue 4): node role ready in under 1.5 s with RSS under 110 MiB; stage+publish+unpublish+unstage
within 1.2x of the raw commands.

os-brick is imported lazily, on the node's first use (publishing its connector properties): the report
gives what importing the adapter costs, what importing os-brick then adds in time and RSS, and how long
collecting the connector properties takes the first time and again, each in a fresh interpreter.

Two cycles are measured. The restage cycle is what every pod restart costs, on a volume formatted before:
the raw side runs mount, mount --bind, umount, umount (the driver mounts first and probes only when that
fails, so neither side probes). The first-stage cycle starts from a blank device each time: the raw side
adds the one blkid probe that formatting only a blank device needs and mkfs.ext4 with the driver's
options; the device is wiped between cycles, untimed. The driver makes mount(2) and umount2(2) calls rather than running
mount(8), so the report also gives the floor: the same four system calls made directly, in process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import grpc

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc
from mbs_csi.filesystems import FILESYSTEMS
from mbs_csi.node.formatting import BLANK_PREFIX
from testkit.controller import ControllerUnderTest
from testkit.csi_requests import create_request, mount_cap
from testkit.driver import driver_env
from testkit.host import REPO, short_tmpdir
from testkit.processes import ProcessTree, exit_on_sigterm
from testkit.wait import wait_until

NODE = "bench-node"
MS_BIND = 4096


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def probe_ready(socket: Path) -> bool:
    if not socket.exists():
        return False
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        try:
            return csi_pb2_grpc.IdentityStub(channel).Probe(pb.ProbeRequest(), timeout=1).ready.value
        except grpc.RpcError:
            return False


def start_once(role: str) -> dict:
    """Seconds from process start to the first Probe answering ready, and RSS then."""
    workdir = short_tmpdir("mbs-bench-")
    socket = workdir / "csi.sock"
    started = time.monotonic()
    tree = ProcessTree(
        [
            sys.executable,
            "-m",
            "mbs_csi",
            "serve",
            "--role",
            role,
            "--endpoint",
            f"unix://{socket}",
            "--state-dir",
            str(workdir / "state"),
            "--backend-workers",
            "2",
        ],
        driver_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # A fresh channel per attempt: a channel that failed once waits out gRPC's reconnect backoff,
        # which would be measured instead of the server.
        wait_until(lambda: probe_ready(socket), 120, f"role {role} to be ready", 0.01)
        ready = time.monotonic() - started
        time.sleep(0.2)
        front = rss_kib(tree.proc.pid)
        workers = sum(rss_kib(p) for p in children(tree.proc.pid))
        return {"ready_s": ready, "rss_mib": front / 1024, "workers_rss_mib": workers / 1024}
    finally:
        tree.proc.terminate()
        tree.proc.wait(30)
        tree.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def startup(runs: int) -> dict:
    results = {}
    for role in ("node", "controller"):
        samples = [start_once(role) for _ in range(runs)]
        results[role] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    return results


# Run in a fresh interpreter: prints the figures of importing the os-brick adapter, then os-brick, then
# collecting this node's connector properties twice, as one JSON line.
_BRICK_FIGURES = """
import json, sys, time, warnings
def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
before = rss_mib()
t = time.perf_counter()
from mbs_csi.node import brick
adapter_s = time.perf_counter() - t
warnings.filterwarnings("ignore")
t = time.perf_counter()
import os_brick.initiator.connector
os_brick_s = time.perf_counter() - t
after = rss_mib()
t = time.perf_counter()
brick.connector_properties("bench-node")
first_s = time.perf_counter() - t
t = time.perf_counter()
brick.connector_properties("bench-node")
again_s = time.perf_counter() - t
print(json.dumps({"adapter_import_s": adapter_s, "os_brick_import_s": os_brick_s, "rss_before_mib": before,
                  "os_brick_rss_mib": after - before, "connector_properties_first_s": first_s,
                  "connector_properties_again_s": again_s}))
"""


def brick_once() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_BRICK_FIGURES)],
        env=driver_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def brick_startup(runs: int) -> dict:
    samples = [brick_once() for _ in range(runs)]
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


def node_cycles(cycles: int) -> dict:
    ctl = ControllerUnderTest(None, extra={"role": "all", "node_id": NODE})
    node = csi_pb2_grpc.NodeStub(ctl.driver.channel)
    try:
        ctl.driver.wait_logged(f"published connector properties of node {NODE}")
        cap = mount_cap("ext4")
        volume_id = ctl.stub.CreateVolume(create_request(f"bench-{uuid.uuid4().hex[:8]}", caps=[cap])).volume.volume_id
        context = dict(
            ctl.stub.ControllerPublishVolume(
                pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=NODE, volume_capability=cap)
            ).publish_context
        )
        staging, target = ctl.workdir / "staging", ctl.workdir / "target"
        stage = pb.NodeStageVolumeRequest(
            volume_id=volume_id, publish_context=context, staging_target_path=str(staging), volume_capability=cap
        )
        publish = pb.NodePublishVolumeRequest(
            volume_id=volume_id,
            publish_context=context,
            staging_target_path=str(staging),
            target_path=str(target),
            volume_capability=cap,
        )
        unpublish = pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        unstage = pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))

        def csi_cycle() -> None:
            node.NodeStageVolume(stage)
            node.NodePublishVolume(publish)
            node.NodeUnpublishVolume(unpublish)
            node.NodeUnstageVolume(unstage)

        device = context["device_path"]

        def raw_cycle() -> None:
            staging.mkdir(exist_ok=True)
            run("mount", "-t", "ext4", device, str(staging))
            target.mkdir(exist_ok=True)
            run("mount", "--bind", str(staging), str(target))
            run("umount", str(target))
            target.rmdir()
            run("umount", str(staging))

        def raw_first_cycle() -> None:
            subprocess.run(["blkid", "-p", device], check=False, capture_output=True)  # exit 2: blank
            with open(device, "rb") as blank:  # and no data without a signature: the first MiB is zeros
                assert not any(blank.read(BLANK_PREFIX))
            run(*FILESYSTEMS["ext4"].mkfs_argv(device))
            raw_cycle()

        libc = ctypes.CDLL(None, use_errno=True)

        def syscall(result: int) -> None:
            if result != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

        def syscall_cycle() -> None:
            staging.mkdir(exist_ok=True)
            syscall(libc.mount(device.encode(), bytes(staging), b"ext4", 0, None))
            target.mkdir(exist_ok=True)
            syscall(libc.mount(bytes(staging), bytes(target), None, MS_BIND, None))
            syscall(libc.umount2(bytes(target), 0))
            target.rmdir()
            syscall(libc.umount2(bytes(staging), 0))

        def wipe() -> None:
            """Make the device blank again, as a new volume is: no signature, zeros at the start."""
            with open(device, "r+b") as blank:
                blank.write(bytes(BLANK_PREFIX))
                os.fsync(blank.fileno())

        csi_cycle()  # the first stage formats; the restage cycles measure what a pod restart costs
        restage: dict[str, list[float]] = {"mbs_csi": [], "raw_commands": [], "system_calls": []}
        for _ in range(cycles):
            for name, cycle in (("mbs_csi", csi_cycle), ("raw_commands", raw_cycle), ("system_calls", syscall_cycle)):
                begin = time.monotonic()
                cycle()
                restage[name].append(time.monotonic() - begin)
        first: dict[str, list[float]] = {"mbs_csi": [], "raw_commands": []}
        for _ in range(max(3, cycles // 3)):
            for name, cycle in (("mbs_csi", csi_cycle), ("raw_commands", raw_first_cycle)):
                wipe()
                begin = time.monotonic()
                cycle()
                first[name].append(time.monotonic() - begin)
        ctl.stub.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=NODE))
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    finally:
        ctl.close()
    return {"restage": summarize_cycles(restage), "first_stage": summarize_cycles(first)}


def summarize_cycles(timings: dict[str, list[float]]) -> dict:
    result: dict = {
        name: {"median_ms": 1000 * statistics.median(v), "max_ms": 1000 * max(v)} for name, v in timings.items()
    }
    result["ratio"] = result["mbs_csi"]["median_ms"] / result["raw_commands"]["median_ms"]
    return result


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="process starts per role")
    parser.add_argument("--cycles", type=int, default=20, help="stage/publish/unpublish/unstage cycles")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    report = {
        "startup": startup(args.runs),
        "os_brick_first_use": brick_startup(args.runs),
        "stage_publish_cycle": node_cycles(args.cycles),
    }
    for role, r in report["startup"].items():
        print(
            f"{role:<11} ready in {r['ready_s']:.2f} s, RSS {r['rss_mib']:.0f} MiB"
            + (f" (+ backend workers {r['workers_rss_mib']:.0f} MiB)" if r["workers_rss_mib"] else "")
        )
    b = report["os_brick_first_use"]
    print(
        f"os-brick    adapter import {1000 * b['adapter_import_s']:.0f} ms; os-brick import "
        f"{b['os_brick_import_s']:.2f} s, +{b['os_brick_rss_mib']:.0f} MiB RSS; connector properties "
        f"{1000 * b['connector_properties_first_s']:.0f} ms first, "
        f"{1000 * b['connector_properties_again_s']:.0f} ms again"
    )
    for kind, c in report["stage_publish_cycle"].items():
        floor = f", system calls alone {c['system_calls']['median_ms']:.1f} ms" if "system_calls" in c else ""
        print(
            f"{kind} stage+publish+unpublish+unstage: mbs-csi {c['mbs_csi']['median_ms']:.1f} ms, raw commands "
            f"{c['raw_commands']['median_ms']:.1f} ms, ratio {c['ratio']:.2f}{floor}"
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
