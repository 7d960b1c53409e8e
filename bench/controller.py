"""Controller benchmark: CreateVolume+DeleteVolume and CreateSnapshot+DeleteSnapshot cycles through
mbs-csi's gRPC API against the same operations as raw in-process cinderlib calls, on the same backend, in
the same run, at several concurrencies; and the backend round trips and median time of every controller
RPC that reaches the backend, made on a front in this process. Prints tables and JSON.

    .venv/bin/python -m bench.controller [--backends loopback,ceph] [--quick] [--json out.json]

Targets (issue 3): per-op time within 1.15x of raw cinderlib at concurrency 1; throughput at concurrency
16 at least 3x that at concurrency 1 on Ceph, or at least 0.9x raw cinderlib's own concurrent ceiling.

On Ceph the raw side connects to the cluster for every operation, as Cinder's RBD driver does; mbs-csi's
workers keep their connections between calls (mbs_csi.controller.rados_reuse). On SQLite the raw side
runs with cinderlib's defaults (rollback journal, a connection per transaction), mbs-csi's workers with
the write-ahead log and pooled connections. The ratios include those differences.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from csi import csi_pb2 as pb
from mbs_csi import config
from mbs_csi.controller.client import BackendClient
from mbs_csi.controller.connector_store import DatabaseConnectorStore
from mbs_csi.controller.pool import WorkerPool
from mbs_csi.controller.service import ControllerService
from mbs_csi.controller.worker_config import worker_config
from testkit.controller import ControllerUnderTest
from testkit.csi_requests import GIB, create_request, mount_cap
from testkit.host import REPO
from testkit.processes import ProcessTree, exit_on_sigterm
from testkit.wait import wait_until


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def summarize(run: dict) -> dict:
    return {
        "create_median_ms": 1000 * statistics.median(run["timings"]["create"]),
        "create_p90_ms": 1000 * p90(run["timings"]["create"]),
        "delete_median_ms": 1000 * statistics.median(run["timings"]["delete"]),
        "delete_p90_ms": 1000 * p90(run["timings"]["delete"]),
        "cycles_per_s": run["cycles"] / run["wall"],
    }


def csi_cycles(stub, kind: str, count: int, concurrency: int) -> dict:
    source = (
        stub.CreateVolume(create_request(f"bench-src-{uuid.uuid4().hex[:8]}")).volume if kind == "snapshot" else None
    )
    timings: dict[str, list[float]] = {"create": [], "delete": []}

    def one(_):
        name = f"bench-{uuid.uuid4().hex[:12]}"
        start = time.monotonic()
        if kind == "volume":
            made_id = stub.CreateVolume(create_request(name)).volume.volume_id
            made = time.monotonic()
            stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=made_id))
        else:
            made_id = stub.CreateSnapshot(
                pb.CreateSnapshotRequest(name=name, source_volume_id=source.volume_id)
            ).snapshot.snapshot_id
            made = time.monotonic()
            stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=made_id))
        timings["create"].append(made - start)
        timings["delete"].append(time.monotonic() - made)

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    wall = time.monotonic() - started
    if source is not None:
        stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=source.volume_id))
    return {"timings": timings, "wall": wall, "cycles": count}


def rpc_round_trips(ctl: ControllerUnderTest, repeats: int) -> dict:
    """Each controller RPC that reaches the backend, made ``repeats`` times on a front in this process
    (the controller's service and a pool of one worker, on ``ctl``'s database and backend): the backend
    round trips it costs (the pool's counter) and its median time, one call at a time."""
    node = "bench-node"
    ctl.register_nodes(node)
    pool = WorkerPool(worker_config(ctl.settings), size=1, call_timeout=120)
    pool.start()
    backend = BackendClient(pool)
    service = ControllerService(ctl.settings, backend, DatabaseConnectorStore(backend))
    measured: dict[str, dict[str, list[float]]] = {}

    def rpc(label: str, method: Callable, request):
        before = sum(pool.calls.values())
        start = time.monotonic()
        answer = method(request, None)
        seconds = time.monotonic() - start
        figures = measured.setdefault(label, {"round_trips": [], "seconds": []})
        figures["round_trips"].append(sum(pool.calls.values()) - before)
        figures["seconds"].append(seconds)
        return answer

    try:
        wait_until(lambda: not pool.problems(), 180, "the in-process front's backend worker")
        warm = service.CreateVolume(create_request(f"bench-warm-{uuid.uuid4().hex[:8]}"), None)  # stats cached
        service.DeleteVolume(pb.DeleteVolumeRequest(volume_id=warm.volume.volume_id), None)
        for _ in range(repeats):
            volume = rpc("CreateVolume", service.CreateVolume, create_request(f"bench-{uuid.uuid4().hex[:12]}"))
            volume_id = volume.volume.volume_id
            snapshot_id = rpc(
                "CreateSnapshot",
                service.CreateSnapshot,
                pb.CreateSnapshotRequest(name=f"bench-{uuid.uuid4().hex[:12]}", source_volume_id=volume_id),
            ).snapshot.snapshot_id
            restored = rpc(
                "CreateVolume from a snapshot",
                service.CreateVolume,
                create_request(f"bench-{uuid.uuid4().hex[:12]}", snapshot=snapshot_id),
            ).volume.volume_id
            clone = rpc(
                "CreateVolume from a volume",
                service.CreateVolume,
                create_request(f"bench-{uuid.uuid4().hex[:12]}", volume=volume_id),
            ).volume.volume_id
            publish = pb.ControllerPublishVolumeRequest(
                volume_id=volume_id, node_id=node, volume_capability=mount_cap()
            )
            rpc("ControllerPublishVolume", service.ControllerPublishVolume, publish)
            rpc("ControllerPublishVolume again", service.ControllerPublishVolume, publish)
            rpc(
                "ControllerUnpublishVolume",
                service.ControllerUnpublishVolume,
                pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node),
            )
            rpc(
                "ControllerExpandVolume",
                service.ControllerExpandVolume,
                pb.ControllerExpandVolumeRequest(
                    volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * GIB)
                ),
            )
            rpc(
                "ControllerModifyVolume",
                service.ControllerModifyVolume,
                pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters={"total_iops_sec": "100"}),
            )
            rpc("ControllerGetVolume", service.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=volume_id))
            rpc(
                "ValidateVolumeCapabilities",
                service.ValidateVolumeCapabilities,
                pb.ValidateVolumeCapabilitiesRequest(volume_id=volume_id, volume_capabilities=[mount_cap()]),
            )
            rpc("GetSnapshot", service.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=snapshot_id))
            for made in (restored, clone):
                rpc("DeleteVolume", service.DeleteVolume, pb.DeleteVolumeRequest(volume_id=made))
            rpc("DeleteSnapshot", service.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))
            rpc("DeleteVolume", service.DeleteVolume, pb.DeleteVolumeRequest(volume_id=volume_id))
    finally:
        pool.close()
    return {
        label: {
            "round_trips": max(figures["round_trips"]),
            "median_ms": 1000 * statistics.median(figures["seconds"]),
        }
        for label, figures in measured.items()
    }


def round_trips_table(name: str, figures: dict) -> str:
    lines = [f"\n{name}: backend round trips per RPC (in-process front, one call at a time)"]
    lines += [
        f"{label:<32}{row['round_trips']:>3} trip(s){row['median_ms']:>10.1f} ms" for label, row in figures.items()
    ]
    return "\n".join(lines)


class RawCinderlibCrashed(RuntimeError):
    pass


class RawCinderlib:
    """The baseline process (``bench.raw_cinderlib``), kept running so that its runs interleave with
    mbs-csi's: both sides then see the same machine and the same state of the backend.

    Raw cinderlib with many green threads on librbd in one process sometimes dies in librbd itself (a
    segfault, or the assertion ``AsyncOpTracker m_pending_ops == 0``), with no Python error. Such a run
    is started again, up to ``RESTARTS`` times, and the crashes are counted in the report."""

    RESTARTS = 3

    def __init__(self, backend: dict, workdir: Path, warmup_concurrency: int, database: str | None) -> None:
        self.setup = {
            "database": database or f"sqlite:///{workdir}/raw.sqlite",
            "locks": str(workdir),
            "state": str(workdir),
            "name": backend["name"],
            "volume_driver": backend["volume_driver"],
            "options": backend["driver_options"],
            "concurrency": warmup_concurrency,
        }
        self.crashes = 0
        self.tree: ProcessTree | None = None
        self._start()

    def _start(self) -> None:
        for _ in range(self.RESTARTS + 1):
            if self.tree is not None:  # what a crashed run left
                self.tree.kill()
            self.tree = ProcessTree(
                [sys.executable, "-m", "bench.raw_cinderlib"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            self.process = self.tree.proc
            try:
                self._ask(self.setup)
                return
            except RawCinderlibCrashed:
                self.crashes += 1
        raise RuntimeError(f"bench.raw_cinderlib crashed {self.crashes} times while starting")

    def _ask(self, message: dict) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        for line in self.process.stdout:
            if line.startswith("{"):  # anything else is a driver printing on stdout
                return json.loads(line)
        raise RawCinderlibCrashed(f"bench.raw_cinderlib exited with {self.process.wait()}")

    def cycles(self, kind: str, count: int, concurrency: int) -> dict:
        for _ in range(self.RESTARTS):
            try:
                return self._ask({"kind": kind, "count": count, "concurrency": concurrency})
            except RawCinderlibCrashed:
                self.crashes += 1
                self._start()
        return self._ask({"kind": kind, "count": count, "concurrency": concurrency})

    def close(self) -> None:
        assert self.process.stdin is not None and self.tree is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=120)
        finally:
            self.tree.kill()


def merged(runs: list[dict]) -> dict:
    """Several rounds of one measurement as one: latencies pooled, throughput over the summed wall time."""
    return {
        "timings": {op: [t for run in runs for t in run["timings"][op]] for op in ("create", "delete")},
        "wall": sum(run["wall"] for run in runs),
        "cycles": sum(run["cycles"] for run in runs),
    }


def bench_backend(
    backend: dict, concurrency: list[int], counts: dict[int, int], workers: int, rounds: int, postgres=None
) -> tuple[dict, dict, int]:
    """Both sides on SQLite files, or on two fresh databases of ``postgres`` (a PostgresCluster).

    Each measurement alternates the two sides ``rounds`` times, mbs-csi first, so that drift in the
    machine or the backend (a Ceph OSD on the same two cores) falls on both alike."""
    new_db = (lambda: postgres.new_database(f"bench_{uuid.uuid4().hex[:8]}")) if postgres else (lambda: None)
    ctl = ControllerUnderTest(new_db(), extra={"backend_workers": workers}, backends=[backend])
    raw = None
    crashes = 0
    try:
        wait_until(lambda: len(ctl.ready_worker_pids()) >= workers, 180, f"{workers} ready backend workers", 0.5)
        for kind in ("volume", "snapshot"):  # warm-up: every worker serves a few calls first
            csi_cycles(ctl.stub, kind, 3 * max(concurrency), max(concurrency))
        trips = rpc_round_trips(ctl, 10 * rounds)
        raw = RawCinderlib(backend, ctl.workdir, max(concurrency), new_db())
        results = {}
        for kind in ("volume", "snapshot"):
            for c in concurrency:
                runs: dict[str, list[dict]] = {"mbs_csi": [], "raw_cinderlib": []}
                for _ in range(rounds):
                    runs["mbs_csi"].append(csi_cycles(ctl.stub, kind, counts[c], c))
                    runs["raw_cinderlib"].append(raw.cycles(kind, counts[c], c))
                results[f"{kind}/{c}"] = {impl: summarize(merged(r)) for impl, r in runs.items()}
    finally:
        if raw is not None:
            crashes = raw.crashes
            raw.close()
        ctl.close()
    return results, trips, crashes


def ratios(results: dict, concurrency: list[int]) -> dict:
    out = {}
    for key, row in results.items():
        out[key] = {
            "create_ratio": row["mbs_csi"]["create_median_ms"] / row["raw_cinderlib"]["create_median_ms"],
            "delete_ratio": row["mbs_csi"]["delete_median_ms"] / row["raw_cinderlib"]["delete_median_ms"],
            "throughput_ratio": row["mbs_csi"]["cycles_per_s"] / row["raw_cinderlib"]["cycles_per_s"],
        }
    for kind in ("volume", "snapshot"):
        low, high = f"{kind}/{min(concurrency)}", f"{kind}/{max(concurrency)}"
        out[f"{kind}/scaling"] = {
            "mbs_csi": results[high]["mbs_csi"]["cycles_per_s"] / results[low]["mbs_csi"]["cycles_per_s"],
            "raw_cinderlib": results[high]["raw_cinderlib"]["cycles_per_s"]
            / results[low]["raw_cinderlib"]["cycles_per_s"],
        }
    return out


def table(name: str, results: dict, derived: dict) -> str:
    lines = [
        f"\n{name}",
        f"{'op/conc':<14}{'impl':<15}{'create med/p90 ms':>20}{'delete med/p90 ms':>20}{'cycles/s':>10}"
        f"{'x raw create/delete':>21}",
    ]
    for key, row in results.items():
        for impl in ("mbs_csi", "raw_cinderlib"):
            r = row[impl]
            row_ratios = derived[key]
            ratio = f"{row_ratios['create_ratio']:.2f}/{row_ratios['delete_ratio']:.2f}" if impl == "mbs_csi" else ""
            lines.append(
                f"{key:<14}{impl:<15}{r['create_median_ms']:>10.1f}/{r['create_p90_ms']:<9.1f}"
                f"{r['delete_median_ms']:>10.1f}/{r['delete_p90_ms']:<9.1f}{r['cycles_per_s']:>10.1f}{ratio:>21}"
            )
    for kind in ("volume", "snapshot"):
        s = derived[f"{kind}/scaling"]
        lines.append(
            f"{kind} throughput, highest/lowest concurrency: mbs-csi {s['mbs_csi']:.2f}x, "
            f"raw cinderlib {s['raw_cinderlib']:.2f}x"
        )
    return "\n".join(lines)


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="loopback,ceph")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="what both sides persist to (postgresql: a throwaway local cluster)",
    )
    parser.add_argument(
        "--backend-workers",
        type=int,
        default=config.Settings().backend_workers,
        help="mbs-csi's backend_workers (default: the driver's default, %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two sides per measurement")
    parser.add_argument("--quick", action="store_true", help="few cycles: checks the benchmark runs, measures little")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON here")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    counts = {c: (2 * c if args.quick else max(20, 5 * c)) for c in concurrency}
    rounds = 1 if args.quick else args.rounds
    report: dict = {
        "concurrency": concurrency,
        "cycles": counts,
        "database": args.database,
        "backend_workers": args.backend_workers,
        "rounds": rounds,
        "backends": {},
    }
    cleanups: list[Callable[[], object]] = []
    postgres = None
    try:
        if args.database == "postgresql":
            from testkit.postgres import PostgresCluster

            postgres = PostgresCluster()
            cleanups.append(postgres.destroy)
        for name in args.backends.split(","):
            if name == "loopback":
                directory = Path(f"/tmp/mbs-bench-{uuid.uuid4().hex[:8]}")
                cleanups.append(functools.partial(shutil.rmtree, directory, ignore_errors=True))
                backend = {
                    "name": "loop",
                    "volume_driver": config.LOOPBACK_DRIVER,
                    "driver_options": {"loopback_dir": str(directory)},
                }
            elif name == "ceph":
                from testkit.ceph import CephCluster

                cluster = CephCluster()
                cleanups.append(cluster.destroy)
                backend = {
                    "name": "ceph",
                    "volume_driver": "cinder.volume.drivers.rbd.RBDDriver",
                    "driver_options": {
                        "rbd_pool": cluster.pool,
                        "rbd_ceph_conf": str(cluster.conf_path),
                        "rbd_user": cluster.user,
                        "rbd_keyring_conf": str(cluster.keyring_path),
                        "rbd_max_clone_depth": 0,
                    },
                }
            else:
                parser.error(f"unknown backend {name}")
            results, trips, crashes = bench_backend(
                backend, concurrency, counts, args.backend_workers, rounds, postgres
            )
            derived = ratios(results, concurrency)
            report["backends"][name] = {
                "results": results,
                "derived": derived,
                "round_trips": trips,
                "raw_cinderlib_crashes": crashes,
            }
            print(table(name, results, derived), flush=True)
            print(round_trips_table(name, trips), flush=True)
            if crashes:
                print(f"raw cinderlib crashed {crashes} time(s) in librbd and was restarted", flush=True)
    finally:
        for cleanup in cleanups:
            cleanup()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
