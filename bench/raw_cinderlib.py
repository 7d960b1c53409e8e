"""The baseline: the same operations as raw in-process cinderlib calls, from green threads in one
eventlet-patched process (the way a Cinder service runs drivers).

Line protocol on stdin/stdout, so that the benchmark can interleave this with mbs-csi's runs: the first
line is the setup job (database, backend, warm-up concurrency), answered by ``{"ready": true}``; every
further line ``{"kind": ..., "count": ..., "concurrency": ...}`` is answered by one JSON line of
per-operation latencies and the wall time."""

import eventlet

eventlet.monkey_patch()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import cinderlib  # noqa: E402


def cycles(backend, kind: str, count: int, concurrency: int) -> dict:
    source = backend.create_volume(size=1, name="bench-source") if kind == "snapshot" else None
    timings: dict[str, list[float]] = {"create": [], "delete": []}

    def one(_):
        start = time.monotonic()
        if kind == "volume":
            thing = backend.create_volume(size=1, name=f"bench-{uuid.uuid4().hex[:8]}")
        else:
            thing = source.create_snapshot(name=f"bench-{uuid.uuid4().hex[:8]}")
        made = time.monotonic()
        thing.delete()
        timings["create"].append(made - start)
        timings["delete"].append(time.monotonic() - made)

    pool = eventlet.GreenPool(concurrency)
    started = time.monotonic()
    list(pool.imap(one, range(count)))
    wall = time.monotonic() - started
    if source is not None:
        source.delete()
    return {"timings": timings, "wall": wall, "cycles": count}


def main() -> None:
    job = json.loads(sys.stdin.readline())
    cinderlib.setup(
        persistence_config={"storage": "db", "connection": job["database"]},
        file_locks_path=job["locks"],
        state_path=job["state"],
        disable_logs=True,
    )
    backend = cinderlib.Backend(volume_backend_name=job["name"], volume_driver=job["volume_driver"], **job["options"])
    for kind in ("volume", "snapshot"):  # warm-up, as on the mbs-csi side
        cycles(backend, kind, 3 * job["concurrency"], job["concurrency"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        run = json.loads(line)
        print(json.dumps(cycles(backend, run["kind"], run["count"], run["concurrency"])), flush=True)


if __name__ == "__main__":
    main()
