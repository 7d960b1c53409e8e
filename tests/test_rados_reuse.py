"""The bookkeeping of mbs_csi.controller.rados_reuse: which connections are kept, handed out again and
shut down. A stand-in driver records what it is asked to do here, because the rules are about counting;
the real RBD driver against a real Ceph cluster is in test_controller_ceph.py (sessions the monitor
sees, a blocklisted connection replaced)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from mbs_csi.controller import rados_reuse


class StandInClient:
    def __init__(self, number: int) -> None:
        self.number = number
        self.state = "connected"


class StandInDriver:
    """Has the two connection methods Cinder's RBD driver has, and records their calls."""

    def __init__(self) -> None:
        self.numbers = itertools.count(1)
        self.opened: list[tuple[str | None, dict[str, Any] | None, int | None]] = []
        self.closed: list[int] = []

    def _connect_to_rados(
        self, pool: str | None = None, remote: dict[str, Any] | None = None, timeout: int | None = None
    ) -> tuple[StandInClient, str]:
        self.opened.append((pool, remote, timeout))
        client = StandInClient(next(self.numbers))
        return client, f"ioctx-{client.number}"

    def _disconnect_from_rados(self, client: StandInClient, ioctx: str) -> None:
        assert ioctx == f"ioctx-{client.number}"
        client.state = "shutdown"
        self.closed.append(client.number)


@pytest.fixture
def driver() -> StandInDriver:
    return StandInDriver()


def reusing(driver: StandInDriver) -> rados_reuse.RadosConnections:
    """Make ``driver`` reuse its connections, which it can: it has both connection methods."""
    connections = rados_reuse.reuse_connections(driver)
    assert connections is not None
    return connections


def test_a_released_connection_is_handed_out_again(driver: StandInDriver) -> None:
    connections = reusing(driver)
    for _ in range(5):
        client, ioctx = driver._connect_to_rados("volumes")
        driver._disconnect_from_rados(client, ioctx)
    assert driver.opened == [("volumes", None, None)] and driver.closed == [] and connections.opened == 1


def test_connections_are_kept_per_pool_cluster_and_timeout(driver: StandInDriver) -> None:
    reusing(driver)
    calls: list[tuple[Any, ...]] = [("volumes",), ("images",), ("volumes", {"name": "dr"}), ("volumes", None, 5)]
    for args in calls * 2:
        driver._disconnect_from_rados(*driver._connect_to_rados(*args))
    assert len(driver.opened) == 4


def test_nested_connections_beyond_keep_are_shut_down(driver: StandInDriver) -> None:
    connections = reusing(driver)
    held = [driver._connect_to_rados() for _ in range(connections.keep + 2)]
    for pair in held:
        driver._disconnect_from_rados(*pair)
    assert len(driver.opened) == connections.keep + 2 and len(driver.closed) == 2
    again = [driver._connect_to_rados() for _ in range(connections.keep)]
    assert len(driver.opened) == connections.keep + 2  # the kept ones, handed out again
    assert {c.number for c, _ in again}.isdisjoint(driver.closed)


def test_a_connection_released_during_an_exception_is_not_kept(driver: StandInDriver) -> None:
    reusing(driver)
    client, ioctx = driver._connect_to_rados()
    try:
        raise OSError(108, "connection shut down")
    except OSError:
        driver._disconnect_from_rados(client, ioctx)  # as RBDVolumeProxy's except clause does
    assert driver.closed == [client.number]
    assert driver._connect_to_rados()[0] is not client


def test_an_idle_connection_past_max_idle_or_shut_down_is_replaced(
    driver: StandInDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = reusing(driver)
    now = [1000.0]
    monkeypatch.setattr(rados_reuse.time, "monotonic", lambda: now[0])
    first = driver._connect_to_rados()
    driver._disconnect_from_rados(*first)
    now[0] += connections.max_idle + 1
    second = driver._connect_to_rados()
    assert second[0] is not first[0] and driver.closed == [first[0].number]
    driver._disconnect_from_rados(*second)
    second[0].state = "shutdown"  # closed behind our back
    third = driver._connect_to_rados()
    assert third[0] is not second[0] and len(driver.opened) == 3


def test_drop_idle_shuts_every_idle_connection_down(driver: StandInDriver) -> None:
    connections = reusing(driver)
    pairs = [driver._connect_to_rados("volumes"), driver._connect_to_rados("images")]
    for pair in pairs:
        driver._disconnect_from_rados(*pair)
    connections.drop_idle()
    assert sorted(driver.closed) == [1, 2]
    driver._disconnect_from_rados(*driver._connect_to_rados("volumes"))
    assert len(driver.opened) == 3


def test_a_driver_without_rados_connections_is_left_alone() -> None:
    class LoopbackLike:
        pass

    assert rados_reuse.reuse_connections(LoopbackLike()) is None
