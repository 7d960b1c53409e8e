"""Session-wide fixtures: one PostgreSQL, one Ceph cluster, and the check that the session leaves no
process behind. Tests using the Ceph cluster are slow (``-m "not slow"`` skips them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit import processes
from testkit.ceph import CephCluster
from testkit.postgres import PostgresCluster

EXIT_GRACE = 15.0  # seconds a process the suite started may take to exit on its own at the end


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "ceph" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session() -> Iterator[None]:
    """Every process the suite starts, directly or not, carries this session's tag (testkit.processes);
    none may be left at the end. Set up before any other session fixture, this is torn down after them:
    the Ceph and PostgreSQL clusters are gone by then. Processes of other runs carry other tags."""
    run = processes.start_run()
    yield
    left = processes.survivors(processes.RUN_VAR, run, EXIT_GRACE)
    processes.kill_tagged(processes.RUN_VAR, run)
    assert not left, "processes started by the test session outlived it (now killed):\n" + "\n".join(left)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One real PostgreSQL for the session (tests that stop it make their own)."""
    cluster = PostgresCluster()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    """One real single-node Ceph cluster for the session: pool ``volumes``, user ``client.cinder``."""
    cluster = CephCluster()
    yield cluster
    cluster.destroy()
