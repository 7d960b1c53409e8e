"""Drive Cinder's stock RBD driver through cinderlib against the test Ceph cluster, in its own process.

    python tests/rbd_cinderlib_child.py CEPH_CONF KEYRING WORKDIR

cinderlib.setup() works once per process and its logging set-up is process-global, hence a child.
Cinder drivers expect eventlet (the RBD driver wraps librados in ``tpool.Proxy``): monkey-patch first.
Prints one JSON document on the last line of stdout: the stats, the connection info (keyring masked)
and how long each operation took.
"""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cinderlib  # noqa: E402


def main(conf: str, keyring: str, workdir: str) -> dict[str, Any]:
    cinderlib.setup(
        persistence_config={"storage": "db", "connection": f"sqlite:///{workdir}/db.sqlite"},
        file_locks_path=workdir,
        state_path=workdir,
        disable_logs=False,
    )
    timings: dict[str, float] = {}

    def timed(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        result = call(*args, **kwargs)
        timings[what] = round(time.monotonic() - start, 3)
        return result

    backend = timed(
        "init",
        cinderlib.Backend,
        volume_backend_name="ceph",
        volume_driver="cinder.volume.drivers.rbd.RBDDriver",
        rbd_pool="volumes",
        rbd_ceph_conf=conf,
        rbd_user="cinder",
        rbd_keyring_conf=keyring,
        # Full copies for clones: a COW clone leaves its source behind as volume-<id>.deleted.
        rbd_max_clone_depth=0,
    )
    stats = timed("stats", backend.stats, refresh=True)

    volume = timed("create_volume", backend.create_volume, size=1, name="source")
    snapshot = timed("create_snapshot", volume.create_snapshot, name="snap")
    from_snapshot = timed("create_volume_from_snapshot", snapshot.create_volume, name="from-snapshot")
    clone = timed("clone", volume.clone, name="clone")
    timed("extend", clone.extend, 2)

    connection = timed("connect", volume.connect, {"host": "node-1", "ip": "127.0.0.1", "multipath": False})
    conn_info = json.loads(json.dumps(connection.conn_info))
    keyring_in_conn_info = conn_info.get("data", {}).get("keyring")
    if keyring_in_conn_info is not None:
        conn_info["data"]["keyring"] = "***"
    timed("disconnect", volume.disconnect, connection)
    sizes = {v.name: v.size for v in (volume, from_snapshot, clone)}

    # Children before parents: deleting a snapshot with a COW child makes the driver flatten the child
    # and retry after rados_connection_interval (5 s).
    timed("delete_volume_from_snapshot", from_snapshot.delete)
    timed("delete_clone", clone.delete)
    timed("delete_snapshot", snapshot.delete)
    timed("delete_volume", volume.delete)
    return {
        "stats": stats,
        "sizes": sizes,
        "conn_info": conn_info,
        "keyring_is_file_content": keyring_in_conn_info == Path(keyring).read_text(),
        "timings": timings,
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4]), default=str))
