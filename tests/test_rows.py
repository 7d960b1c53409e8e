"""mbs_csi.controller.rows writes and reads what cinderlib's persistence would, on SQLite and PostgreSQL.

The rows module bypasses cinderlib's persistence on the hot path; these tests pin it to cinderlib's own
behaviour, so that a difference (a field cinderlib sets and we do not, a row left behind) shows here
rather than as a volume another cinderlib user cannot read. The work runs in tests/rows_child.py.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from testkit.child import run_python_json
from testkit.host import short_tmpdir


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def found(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """What the child found, once per database for the whole module (it writes and reads everything)."""
    workdir = short_tmpdir("mbs-rows-")
    if request.param == "sqlite":
        database = f"sqlite:///{workdir}/db.sqlite"
    else:
        database = request.getfixturevalue("postgres").new_database(f"rows_{uuid.uuid4().hex[:8]}")
    try:
        yield run_python_json("-m", "tests.rows_child", database, str(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_new_volume_reads_back_as_cinderlib_would_have_written_it(found: dict[str, Any]) -> None:
    inserted = found["inserted_volume"]
    assert inserted["rows"] == inserted["cinderlib"]
    assert inserted["rows"]["status"] == "creating"
    assert inserted["rows"]["size"] == 2
    assert found["inserted_volume_metadata"] == {"team": "storage", "tier": "gold"}


def test_a_new_snapshot_reads_back_as_cinderlib_would_have_written_it(found: dict[str, Any]) -> None:
    inserted = found["inserted_snapshot"]
    assert inserted["rows"] == inserted["cinderlib"]
    assert inserted["rows"]["volume_size"] == 2


def test_loading_one_row_gives_the_fields_cinderlib_loads(found: dict[str, Any]) -> None:
    for kind in ("loaded_volume", "loaded_snapshot"):
        ours, theirs = found[kind]["rows"], found[kind]["cinderlib"]
        common = ours.keys() & theirs.keys()
        assert len(common) > 15, common
        assert {k: ours[k] for k in common} == {k: theirs[k] for k in common}
        # What we leave out are the related rows cinderlib joins in; they load when read.
        assert not set(ours) - set(theirs)
    lazy = found["loaded_volume_lazy"]
    assert lazy["metadata"] == {"team": "storage", "tier": "gold"}
    assert lazy["volume_type_id"] == found["inserted_volume"]["cinderlib"]["volume_type_id"]
    assert lazy["backend"] == "loop"
    assert found["missing"] == [None, None]


def test_marking_available_writes_status_and_model_update(found: dict[str, Any]) -> None:
    marked = found["marked"]
    assert marked["volume"] == ["available", "loop:ours"]
    assert marked["volume_updated_at_set"]
    assert marked["snapshot"] == "available"
    # A model update touching other tables (metadata) goes through cinderlib's save.
    assert marked["metadata_update"] == ["available", {"added": "by-driver"}]
    assert marked["changes_left"] == []


def test_typed_volumes_are_left_to_cinderlib(found: dict[str, Any]) -> None:
    assert found["typed"] == {"extra_specs": {"thin": "true"}}


def test_forgetting_leaves_no_row_in_any_table(found: dict[str, Any]) -> None:
    assert found["left_after_forget"] == {
        "volumes": 0,
        "volume_metadata": 0,
        "volume_admin_metadata": 0,
        "snapshots": 0,
        "snapshot_metadata": 0,
        "volume_types": 0,
    }
    assert found["found_after_forget"] == [None, []]
