"""Probe answers ready=false, with the reason in the log, while a role's dependency is unhealthy, and
ready=true again once it recovers; the server never stops for it."""

from __future__ import annotations

import shutil

import pytest

from testkit.driver import running_driver
from testkit.host import free_port, short_tmpdir
from testkit.postgres import PostgresCluster


def test_node_not_ready_while_its_state_dir_is_not_writable():
    workdir = short_tmpdir()
    state = workdir / "state"
    try:
        with running_driver("--role", "node", "--state-dir", str(state), workdir=workdir) as driver:
            driver.wait_ready()
            shutil.rmtree(state)
            state.write_text("a file where the state dir should be")
            assert driver.probe() is False
            assert f"not ready: state dir {state} is not writable" in driver.log()
            state.unlink()
            assert driver.probe() is True  # the check recreates the dir: ready again at once
            assert driver.log().rstrip().splitlines()[-2].endswith(": ready")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_controller_not_ready_while_the_database_is_unreachable():
    url = f"postgresql://mbs:pw-not-logged@127.0.0.1:{free_port()}/mbs"
    with running_driver("--role", "controller", "--database", url) as driver:
        # Once the first backend worker failed to start, the problems stay the same: a second probe finds
        # nothing new to log. (Before that, "backend workers are starting" changes into the worker's error.)
        driver.wait_logged("retrying in")
        assert driver.probe() is False
        assert driver.probe() is False
        log = driver.log()
    assert "not ready: database postgresql://mbs:***@127.0.0.1" in log
    assert 'is not reachable: connection to server at "127.0.0.1"' in log
    assert log.count("not ready:") == 1  # logged when it changes, not on every probe
    assert "pw-not-logged" not in log


@pytest.mark.slow
def test_controller_follows_a_real_postgresql_going_down_and_up():
    cluster = PostgresCluster()
    try:
        with running_driver("--role", "controller", "--database", cluster.url()) as driver:
            driver.wait_ready()
            cluster.stop()
            assert driver.probe() is False
            cluster.start()
            driver.wait_ready()
    finally:
        cluster.destroy()


def test_all_role_on_sqlite_is_ready_and_creates_the_database_file():
    workdir = short_tmpdir()
    try:
        with running_driver(workdir=workdir) as driver:
            driver.wait_ready()
        assert (workdir / "state" / "mbs-csi.sqlite").exists()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
