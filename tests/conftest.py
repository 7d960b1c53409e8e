from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ceph import CephCluster
from tests.postgres import PostgresCluster


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
