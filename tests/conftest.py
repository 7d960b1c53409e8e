from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.postgres import PostgresCluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One real PostgreSQL for the session (tests that stop it make their own)."""
    cluster = PostgresCluster()
    yield cluster
    cluster.destroy()
