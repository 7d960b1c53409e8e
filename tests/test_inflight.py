"""The in-flight table: conflicting calls are ABORTED, readers of one volume share it."""

from __future__ import annotations

import pytest

from mbs_csi import errors
from mbs_csi.inflight import InFlight


def test_exclusive_keys_conflict_and_are_released():
    table = InFlight()
    with table.hold("volume:a"):
        with pytest.raises(errors.Aborted, match="volume:a is already in progress"), table.hold("volume:a"):
            pass
        with table.hold("volume:b"):
            pass
    with table.hold("volume:a"):
        pass


def test_shared_holders_coexist_but_exclude_an_exclusive_one_both_ways():
    table = InFlight()
    with (
        table.hold("snapshot-name:s1", shared=["volume:a"]),
        table.hold("snapshot-name:s2", shared=["volume:a"]),
        pytest.raises(errors.Aborted),
        table.hold("volume:a"),
    ):
        pass
    with table.hold("volume:a"), pytest.raises(errors.Aborted), table.hold("name:x", shared=["volume:a"]):
        pass
    with table.hold("volume:a"):  # every hold above was released
        pass


def test_a_refused_hold_takes_nothing():
    table = InFlight()
    with table.hold("volume:b"):
        with pytest.raises(errors.Aborted), table.hold("name:n", "volume:b"):
            pass
        with table.hold("name:n"):  # name:n was not left held by the refused call
            pass
