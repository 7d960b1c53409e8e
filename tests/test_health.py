"""Alive is not ready (issue 12, defect 7): /livez asks whether the driver answers, /readyz is Probe, and
Probe needs only the default backend; every other backend that fails is named in the log and a metric."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mbs_csi import config
from mbs_csi.health_http import HealthServer
from testkit.driver import running_driver
from testkit.host import free_port, short_tmpdir
from testkit.http import get, scrape
from testkit.wait import wait_until


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(workdir: Path, backends: list[dict[str, object]]) -> Path:
    path = workdir / "mbs.yaml"
    path.write_text(yaml.safe_dump({"backends": backends}))
    return path


def loopback(name: str, workdir: Path) -> dict[str, object]:
    return {
        "name": name,
        "volume_driver": config.LOOPBACK_DRIVER,
        "driver_options": {"loopback_dir": str(workdir / name)},
    }


BROKEN = {"name": "broken", "volume_driver": "cinder.volume.drivers.nope.NopeDriver"}


def test_alive_while_not_ready_and_ready_once_the_database_answers(workdir: Path) -> None:
    """A controller whose database is unreachable is alive (a restart would not help) and not ready."""
    health, dead_db = free_port(), free_port()
    args = ["--role", "controller", "--health-endpoint", f"127.0.0.1:{health}"]
    args += ["--database", f"postgresql://mbs:secret@127.0.0.1:{dead_db}/mbs"]
    with running_driver(*args, workdir=workdir):
        assert get(health, "/livez") == (200, "ok\n")
        code, text = get(health, "/readyz")
        assert code == 503 and "is not reachable" in text and "secret" not in text
        assert get(health, "/elsewhere")[0] == 404


def test_readyz_follows_probe(workdir: Path) -> None:
    health = free_port()
    with running_driver("--role", "node", "--health-endpoint", f"127.0.0.1:{health}", workdir=workdir) as driver:
        driver.wait_ready()
        assert get(health, "/readyz") == (200, "ok\n")
        assert get(health, "/livez") == (200, "ok\n")


def test_livez_fails_when_the_grpc_server_does_not_answer(workdir: Path) -> None:
    """Nothing serves on the target: the check says so instead of answering ok."""
    server = HealthServer(f"127.0.0.1:{free_port()}", f"unix://{workdir}/nobody.sock", lambda: [])
    assert server.alive() == "the driver's gRPC server does not answer: UNAVAILABLE"


def test_one_broken_backend_does_not_make_the_controller_unready(workdir: Path) -> None:
    metrics = free_port()
    path = write_config(workdir, [loopback("loop", workdir), BROKEN])
    args = ["--role", "controller", "--config", str(path), "--metrics-endpoint", f"127.0.0.1:{metrics}"]
    with running_driver(*args, workdir=workdir) as driver:
        driver.wait_ready()  # the default backend (the first) serves
        wait_until(lambda: 'mbs_csi_backend_up{backend="broken"}' in scrape(metrics), 60, "the backend metric")
        samples = scrape(metrics)
        assert samples['mbs_csi_backend_up{backend="broken"}'] == 0.0
        assert samples['mbs_csi_backend_up{backend="loop"}'] == 1.0
        assert samples["mbs_csi_ready"] == 1.0
        driver.wait_logged("No module named 'cinder.volume.drivers.nope'")


def test_a_broken_default_backend_makes_it_unready(workdir: Path) -> None:
    path = write_config(workdir, [BROKEN, loopback("loop", workdir)])
    with running_driver("--role", "controller", "--config", str(path), workdir=workdir) as driver:
        reason = "not ready: backend broken failed to initialise: "
        wait_until(lambda: not driver.probe() and reason in driver.log(), 60, "Probe not ready, naming the backend")
