"""A real ``mbs-csi serve --role controller`` on the loopback backend, with its database (SQLite or a
real PostgreSQL), and the means to register nodes' connector properties the way a node does."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy
import yaml

from csi import csi_pb2_grpc
from mbs_csi import config
from mbs_csi.controller.client import BackendClient
from mbs_csi.controller.pool import WorkerPool
from mbs_csi.controller.worker_config import worker_config
from testkit import loop
from testkit.driver import Driver
from testkit.host import short_tmpdir

if TYPE_CHECKING:  # a type of the fixture helper only
    import pytest

ZONE_KEY = "topology.mbs.csi.io/zone"

_VOLUME_TYPE = sqlalchemy.text("SELECT volume_type_id FROM volumes WHERE id = :id")
_TYPE_SPECS = sqlalchemy.text(
    "SELECT q.key, q.value FROM volume_types t JOIN quality_of_service_specs q ON q.specs_id = t.qos_specs_id "
    "WHERE t.id = :type AND q.key != 'consumer' "
    "UNION ALL SELECT key, value FROM volume_type_extra_specs WHERE volume_type_id = :type"
)


def connector_for(node_id: str) -> dict[str, object]:
    """Connector properties as os-brick reports them for a host without iSCSI/FC/NVMe hardware."""
    return {
        "host": node_id,
        "ip": "127.0.0.1",
        "multipath": False,
        "platform": "x86_64",
        "os_type": "linux",
        "do_local_attach": False,
        "initiator": f"iqn.1994-05.com.redhat:{node_id}",
    }


def loopback_backend(directory: Path) -> dict[str, object]:
    return {
        "name": "loop",
        "volume_driver": config.LOOPBACK_DRIVER,
        "driver_options": {"loopback_dir": str(directory)},
        "topology": {ZONE_KEY: "zone-a"},
    }


class ControllerUnderTest:
    def __init__(
        self, database: str | None, extra: dict[str, object] | None = None, backends: list[dict] | None = None
    ) -> None:
        self.workdir = short_tmpdir("mbs-ctl-")
        self.state = self.workdir / "state"
        self.loopback = self.state / "loopback"
        self.config_path = self.workdir / "mbs.yaml"
        settings: dict[str, object] = {
            "role": "controller",
            "state_dir": str(self.state),
            "backend_workers": 2,
            "backends": backends or [loopback_backend(self.loopback)],
            # No periodic audit unless a test asks: its worker would be one more child of the front.
            "audit_interval": 0,
            **(extra or {}),
        }
        if database:
            settings["database"] = database
        self.config_path.write_text(yaml.safe_dump(settings))
        self.settings = config.load_settings(str(self.config_path), env={})
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def start(self) -> None:
        """Start the driver and wait until it is ready: a backend worker is up, so the database schema
        exists (another process migrating it at the same time would find it locked)."""
        driver = Driver(["--config", str(self.config_path)], self.workdir)
        try:
            driver.wait_serving().wait_ready()
        except BaseException:
            driver.close()
            raise
        self.driver = driver
        self.stub = csi_pb2_grpc.ControllerStub(driver.channel)

    def restart(self) -> None:
        assert self.driver.stop() == 0
        self.driver.close()
        self.start()

    def register_nodes(self, *node_ids: str) -> None:
        """Publish connector properties the way a node does at start (database connector store)."""
        pool = WorkerPool(worker_config(self.settings), size=1, call_timeout=60)
        pool.start()
        try:
            for node_id in node_ids:
                BackendClient(pool).set_connector(node_id, connector_for(node_id))
        finally:
            pool.close()

    def volume_type(self, volume_id: str) -> tuple[str, dict[str, str]]:
        """The volume's type as the database holds it: (its id, its QoS and extra specs), read directly."""
        engine = sqlalchemy.create_engine(self.settings.database)
        try:
            with engine.connect() as connection:
                type_id = connection.execute(_VOLUME_TYPE, {"id": volume_id}).scalar_one()
                specs = dict(connection.execute(_TYPE_SPECS, {"type": type_id}).all())
        finally:
            engine.dispose()
        return type_id, specs

    def volume_type_names(self) -> list[str]:
        """The names of every volume type in the database."""
        return sorted(row[0] for row in self.execute("SELECT name FROM volume_types"))

    def execute(self, statement: str, **parameters: object) -> list[sqlalchemy.Row]:
        """Run one SQL statement on the controller's database (committed); the rows it returns."""
        engine = sqlalchemy.create_engine(self.settings.database)
        try:
            with engine.begin() as connection:
                result = connection.execute(sqlalchemy.text(statement), parameters)
                return list(result.all()) if result.returns_rows else []
        finally:
            engine.dispose()

    def volume_file(self, volume_id: str) -> Path:
        return self.loopback / f"volume-{volume_id}"

    def backend_volume_files(self) -> list[Path]:
        return sorted(self.loopback.glob("volume-*"))

    def loop_devices(self) -> list[str]:
        """Loop devices bound to any file of this backend."""
        return loop.devices_under(self.loopback)

    def ready_worker_pids(self) -> list[int]:
        """Workers that finished starting (the pool logs each one) and were not reported dead since, still
        running. The last line naming a pid decides: pids are reused (``pid_max`` may be as low as 32768),
        so a worker starting now may carry the pid of one that was ready before."""
        ready: dict[int, bool] = {}
        for line in self.driver.log().splitlines():
            for pid in re.findall(r"backend worker (\d+)|\(worker (\d+) ", line):
                ready[int(pid[0] or pid[1])] = line.endswith(" ready")
        return sorted({pid for pid, is_ready in ready.items() if is_ready} & set(self.worker_pids()))

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.driver.proc.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.driver.stop()
        self.driver.close()
        for device in self.loop_devices():
            loop.detach(device)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def controller_on(
    request: pytest.FixtureRequest,
    nodes: tuple[str, ...],
    extra: dict[str, object] | None = None,
    backends: list[dict] | None = None,
) -> Iterator[ControllerUnderTest]:
    """A controller on the database ``request.param`` names ("sqlite", or "postgresql": a new database of
    the session's ``postgres`` fixture), with ``nodes`` registered; fails if it leaves a loop device bound."""
    database = None
    if request.param == "postgresql":
        database = request.getfixturevalue("postgres").new_database(f"ctl_{uuid.uuid4().hex[:8]}")
    controller = ControllerUnderTest(database, extra, backends)
    controller.register_nodes(*nodes)
    yield controller
    leftovers = controller.loop_devices()
    controller.close()
    assert leftovers == [], "loop devices left bound"


def unique(prefix: str = "pvc") -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
