"""A child process driving the loopback backend through real cinderlib, for tests/test_loopback_driver.py.

cinderlib's setup is once per process and patches process-global state (eventlet, logging), so the tests
run it here. Usage::

    python -m tests.loopback_child WORKDIR LOOPBACK_DIR

It answers one JSON request per stdin line (``{"op": "create", "size": 1}``) with one JSON line on its
protocol stream: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "Class: message"}``. Logs
(oslo.log writes to stdout by default) go to stderr, so the protocol stream carries nothing else.

``{"op": "hang_after_copies", "marker": PATH}`` makes every later copy stop once ``cp`` is done, before
the copy gets its real name: the child creates PATH and waits there, for the test to kill it mid-copy.
"""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import json  # noqa: E402 - after monkey-patching, as in the real worker
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

DRIVER = "mbs_csi.drivers.loopback.LoopbackDriver"
BACKEND = "loopback-test"
CONNECTOR = {"host": "test-node", "platform": "x86_64", "os_type": "linux", "multipath": False}


def volume_info(vol: Any) -> dict[str, Any]:
    return {"id": vol.id, "name": vol._ovo.name, "size": vol.size, "status": vol.status}


def main() -> None:
    workdir, loopback_dir = sys.argv[1], sys.argv[2]
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import cinderlib

    cinderlib.setup(
        persistence_config={"storage": "db", "connection": f"sqlite:///{workdir}/db.sqlite"},
        file_locks_path=workdir,  # as the controller's workers: the lock files in the state path
        state_path=workdir,
        disable_logs=False,
        debug=True,
    )
    backend = cinderlib.Backend(volume_backend_name=BACKEND, volume_driver=DRIVER, loopback_dir=loopback_dir)

    def volume(vid: str) -> Any:
        return cinderlib.Volume.get_by_id(vid)

    def snapshot(sid: str) -> Any:
        return cinderlib.Snapshot.get_by_id(sid)

    def sized(size: int | None) -> dict[str, int]:
        return {} if size is None else {"size": size}

    def connect(id: str) -> dict[str, Any]:
        return volume(id).connect(CONNECTOR).connection_info["conn"]

    def disconnect(id: str) -> int:
        vol = volume(id)
        conns = list(vol.connections)
        for conn in conns:
            conn.disconnect()
        return len(conns)

    def new_backend(cfg: dict[str, Any]) -> dict[str, Any]:
        other = cinderlib.Backend(volume_backend_name=cfg.pop("name"), volume_driver=DRIVER, **cfg)
        return other.stats(refresh=True)

    def stored(id: str) -> dict[str, Any]:
        # Read back from the database. (Not through Volume.jsons: cinderlib 5.2's serialization breaks with
        # oslo.versionedobjects >= 3.10, whose FieldType.to_primitive is no longer a staticmethod.)
        return {**volume_info(volume(id)), "connections": len(volume(id).connections)}

    def hang_after_copies(marker: str) -> None:
        from mbs_csi.drivers import loopback

        run = loopback._run

        def run_then_hang(cmd: list[str], timeout: float | None = None) -> str:
            out = run(cmd, timeout)
            if cmd[0] == "cp":
                Path(marker).touch()
                while True:
                    time.sleep(3600)
            return out

        loopback._run = run_then_hang

    ops: dict[str, Callable[..., Any]] = {
        "create": lambda size: volume_info(backend.create_volume(size=size)),
        "clone": lambda id, size=None: volume_info(volume(id).clone(**sized(size))),
        "snapshot": lambda id: {"id": (s := volume(id).create_snapshot()).id, "name": s._ovo.name},
        "from_snapshot": lambda id, size=None: volume_info(snapshot(id).create_volume(**sized(size))),
        "extend": lambda id, size: volume(id).extend(size),
        "connect": connect,
        "disconnect": disconnect,
        "delete": lambda id: volume(id).delete(),
        "delete_snapshot": lambda id: snapshot(id).delete(),
        "stats": lambda refresh=True: backend.stats(refresh=refresh),
        "new_backend": new_backend,
        "stored": stored,
        "hang_after_copies": hang_after_copies,
        # What the controller asks of the driver for a volume or snapshot with no usable record.
        "driver_delete": lambda kind, name: getattr(backend.driver, f"delete_{kind}")(SimpleNamespace(name=name)),
    }

    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = {"ok": True, "result": ops[op](**request)}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(reply, default=str) + "\n")


if __name__ == "__main__":
    main()
