"""A throwaway single-node Ceph cluster for tests: one monitor, one manager and one memstore OSD on
127.0.0.1 with cephx on, everything (config, keyrings, data, logs, sockets) in a temp dir under /tmp.

It holds a replicated pool ``volumes`` (size 1) initialised for RBD and a ``client.cinder`` user limited
to that pool, as a Ceph administrator would give Cinder. The kernel has no krbd: clients use it through
librados/librbd only (the ``rados``/``rbd`` Python modules, the ``ceph``/``rbd`` commands).

``ceph.conf`` tells clients where their keyring is (``<dir>/ceph.client.<id>.keyring``), as
``/etc/ceph`` does on a Cinder host: Cinder's RBD driver connects with ``rados_id`` and the conf file
only, and reads ``rbd_keyring_conf`` just to put the keyring into connection info.

The daemons run in the foreground as children of the test process, as root, each started through
``setpriv --pdeathsig KILL``: the kernel kills them when the thread that started them exits, even if
pytest itself is killed. ``destroy()`` (also registered with atexit) kills them and removes the dir.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import signal
import subprocess
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testkit.host import free_port, short_tmpdir
from testkit.wait import WaitTimeout, wait_until

# The OSD keeps objects in memory; images are thin, so only written extents count against this.
MEMSTORE_BYTES = 1 << 30
START_TIMEOUT = 60.0
COMMAND_TIMEOUT = 120.0
MGR_MODULES = Path("/usr/share/ceph/mgr")
ADMIN_CAPS = {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"}
MGR_CAPS = {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"}
OSD_CAPS = {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"}


class CephError(RuntimeError):
    pass


class CephCluster:
    pool = "volumes"
    user = "cinder"

    def __init__(self) -> None:
        self.dir = short_tmpdir("mbs-ceph-")
        self.fsid = str(uuid.uuid4())
        self.mon_port_v2 = free_port()
        self.mon_port_v1 = free_port()
        self.conf_path = self.dir / "ceph.conf"
        self.admin_keyring_path = self.dir / "ceph.client.admin.keyring"
        self.keyring_path = self.dir / f"ceph.client.{self.user}.keyring"
        self.log_dir = self.dir / "log"
        self.key = ""
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}
        atexit.register(self.destroy)
        try:
            self._bootstrap()
        except BaseException as e:
            logs = "\n".join(self.log_tail(name) for name in self._daemons)
            self.destroy()
            if isinstance(e, CephError) and logs:
                raise CephError(f"{e}\n{logs}") from e
            raise

    @property
    def mon_host(self) -> str:
        """The monitor's address vector: msgr2 and msgr1 (Cinder parses the v1 ``addr`` of ``mon dump``)."""
        return f"[v2:127.0.0.1:{self.mon_port_v2},v1:127.0.0.1:{self.mon_port_v1}]"

    # --- admin helpers -------------------------------------------------------------------------------

    def ceph(self, *args: str) -> str:
        """Run the ``ceph`` command as client.admin; return its stdout."""
        return self._run("ceph", "--conf", str(self.conf_path), "--id", "admin", "--connect-timeout", "30", *args)

    def ceph_json(self, *args: str) -> Any:
        return json.loads(self.ceph(*args, "--format", "json"))

    def rbd(self, *args: str, user: str = "admin") -> str:
        """Run the ``rbd`` command (as client.admin unless ``user`` says otherwise); return its stdout."""
        return self._run("rbd", "--conf", str(self.conf_path), "--id", user, *args)

    def images(self) -> list[str]:
        """The images in the pool, including any a driver left behind (e.g. ``volume-<id>.deleted``)."""
        return sorted(json.loads(self.rbd("ls", "--pool", self.pool, "--format", "json")))

    def log_tail(self, name: str, lines: int = 40) -> str:
        """The end of a daemon's log (``mon.a``, ``mgr.x``, ``osd.0``) and of its stdout/stderr."""
        parts = []
        for path in (self.log_dir / f"{name}.log", self.log_dir / f"{name}.out"):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append("\n".join([f"--- {path}", *tail]))
        return "\n".join(parts)

    def _run(self, *argv: str) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, cwd=self.dir)
        if proc.returncode:
            raise CephError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    # --- bootstrap -----------------------------------------------------------------------------------

    def _bootstrap(self) -> None:
        for sub in ("log", "run", "crash", "mon", "mgr/ceph-x", "osd/ceph-0", "mgr-modules"):
            (self.dir / sub).mkdir(parents=True)
        # The manager loads only rbd_support of its Python modules: loading them all costs ~250 MiB
        # and several seconds. Its built-in part serves `df` and PG stats, which is what clients need.
        for name in ("mgr_module.py", "mgr_util.py", "rbd_support"):
            (self.dir / "mgr-modules" / name).symlink_to(MGR_MODULES / name)
        self.conf_path.write_text(self._conf())

        # Every daemon's key goes into the monitor's initial keyring: no `auth add` round trips later.
        mon_keyring = self.dir / "mon.keyring"
        self._keyring(mon_keyring, "mon.", {"mon": "allow *"})
        self._keyring(self.admin_keyring_path, "client.admin", ADMIN_CAPS)
        self._keyring(self.dir / "mgr/ceph-x/keyring", "mgr.x", MGR_CAPS)
        self._keyring(self.dir / "osd/ceph-0/keyring", "osd.0", OSD_CAPS)
        for keyring in (self.admin_keyring_path, self.dir / "mgr/ceph-x/keyring", self.dir / "osd/ceph-0/keyring"):
            self._run("ceph-authtool", str(mon_keyring), "--import-keyring", str(keyring))

        monmap = self.dir / "monmap"
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", self.mon_host, str(monmap))
        conf = ["--conf", str(self.conf_path)]
        self._run("ceph-mon", *conf, "--id", "a", "--mkfs", "--monmap", str(monmap), "--keyring", str(mon_keyring))
        self._start("mon.a", "ceph-mon")
        self._start("mgr.x", "ceph-mgr")
        # The always-on modules left out above would turn health to HEALTH_ERR ("Not found or unloadable").
        self.ceph("health", "mute", "MGR_MODULE_ERROR", "--sticky")

        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise CephError(f"`ceph osd new` gave OSD id {osd_id!r}, expected 0")
        self._run("ceph-osd", *conf, "--id", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._start("osd.0", "ceph-osd")
        self._wait("the OSD up and in", self._osd_up)

        self.ceph("osd", "pool", "create", self.pool, "8", "8", "replicated")
        self.rbd("pool", "init", self.pool)
        caps = ["mon", "profile rbd", "osd", f"profile rbd pool={self.pool}"]
        self.ceph("auth", "get-or-create", f"client.{self.user}", *caps, "--out-file", str(self.keyring_path))
        self.key = self.ceph("auth", "get-key", f"client.{self.user}").strip()
        self._wait("HEALTH_OK with all PGs active+clean", self._healthy)

    def _keyring(self, path: Path, name: str, caps: dict[str, str]) -> None:
        cap_args = [arg for service, cap in caps.items() for arg in ("--cap", service, cap)]
        self._run("ceph-authtool", "--create-keyring", str(path), "--gen-key", "-n", name, *cap_args)

    def _conf(self) -> str:
        d = self.dir
        return textwrap.dedent(f"""\
            [global]
            fsid = {self.fsid}
            mon host = {self.mon_host}
            public addr = 127.0.0.1
            auth cluster required = cephx
            auth service required = cephx
            auth client required = cephx
            auth allow insecure global id reclaim = false
            keyring = {d}/$cluster.$name.keyring
            run dir = {d}/run
            crash dir = {d}/crash
            log file = {d}/log/$name.log
            mon cluster log file = {d}/log/cluster.log
            osd pool default size = 1
            osd pool default min size = 1
            osd pool default pg autoscale mode = off
            osd crush chooseleaf type = 0
            mon allow pool size one = true
            mon allow pool delete = true
            mon warn on pool no redundancy = false
            # Lets librbd use clone v2, as Cinder's RBD driver recommends ("fewer deletion issues").
            mon osd initial require min compat client = mimic
            mon data avail warn = 1
            mon data avail crit = 0
            # Snapshot create/delete wait for a monitor proposal, which the default batches for 1 s.
            paxos propose interval = 0.01
            # Fail instead of hanging for minutes when a daemon is gone.
            client mount timeout = 30
            rados mon op timeout = 60
            rados osd op timeout = 60

            [mon]
            mon data = {d}/mon/$cluster-$id
            keyring = $mon_data/keyring

            [mgr]
            mgr data = {d}/mgr/$cluster-$id
            keyring = $mgr_data/keyring
            mgr module path = {d}/mgr-modules
            # PG states reach `ceph pg stat`/`ceph df` within a second instead of five.
            mgr stats period = 1
            mgr tick period = 1

            [osd]
            osd data = {d}/osd/$cluster-$id
            keyring = $osd_data/keyring
            osd objectstore = memstore
            memstore device bytes = {MEMSTORE_BYTES}
            """)

    def _start(self, name: str, binary: str) -> None:
        daemon_id = name.split(".", 1)[1]
        argv = [binary, "-f", "--conf", str(self.conf_path), "--id", daemon_id]
        with open(self.log_dir / f"{name}.out", "wb") as out:
            self._daemons[name] = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )

    def _osd_up(self) -> bool:
        stat = self.ceph_json("osd", "stat")
        return stat["num_up_osds"] == 1 and stat["num_in_osds"] == 1

    def _healthy(self) -> bool:
        summary = self.ceph_json("pg", "stat")["pg_summary"]
        clean = {s["name"]: s["num"] for s in summary["num_pg_by_state"]}.get("active+clean", 0)
        return 0 < clean == summary["num_pgs"] and self.ceph_json("health")["status"] == "HEALTH_OK"

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        def daemons_up_and_ready() -> bool:
            for name, proc in self._daemons.items():
                if proc.poll() is not None:
                    raise CephError(f"{name} exited with {proc.returncode}")
            return ready()

        try:
            wait_until(daemons_up_and_ready, START_TIMEOUT, what, interval=0.2)
        except WaitTimeout as timeout:
            raise CephError(str(timeout)) from None

    # --- teardown ------------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Kill the daemons (the data is thrown away, so no clean shutdown) and remove the directory."""
        for proc in self._daemons.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self._daemons.values():
            proc.wait(30)
        self._daemons.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.destroy)
