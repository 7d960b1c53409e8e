"""The node's local attachment store, on real SQLite files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mbs_csi import secrets
from mbs_csi.node.store import FILENAME, SCHEMA_VERSION, Attachment, AttachmentStore, StoreError
from testkit.host import REPO

CHAP_PASSWORD = "chap-node-store-0123456789"
KEYRING = "[client.cinder]\n\tkey = AQBnodeStoreKeyringValue0123456789==\n"
REGISTERED = "registered-secret-under-an-innocent-name"
secrets.register(REGISTERED)


def iscsi(volume_id: str) -> Attachment:
    return Attachment(
        volume_id=volume_id,
        staging_path=f"/var/lib/kubelet/plugins/kubernetes.io/csi/mbs/{volume_id}/globalmount",
        access_type="mount",
        fs_type="ext4",
        connection_info={
            "driver_volume_type": "iscsi",
            "data": {"target_iqn": f"iqn.2010-10.org.openstack:{volume_id}", "target_portal": "192.0.2.5:3260"},
        },
        device_info={"type": "block", "path": "/dev/sdb", "scsi_wwn": "360000000000000000e00000000010001"},
        device_path="/dev/sdb",
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AttachmentStore]:
    s = AttachmentStore.in_state_dir(tmp_path)
    yield s
    s.close()


def test_round_trip_and_missing(store: AttachmentStore):
    a = iscsi("vol-1")
    a.device_info["nested"] = {"n": [1, 2]}
    store.put(a)
    assert store.get("vol-1") == a
    assert store.get("vol-2") is None
    assert Path(store.path).name == FILENAME


def test_put_replaces_the_record_of_the_same_volume(store: AttachmentStore):
    store.put(iscsi("vol-1"))
    block = Attachment("vol-1", "/staging/vol-1", "block", device_info={"type": "local", "path": "/dev/loop3"})
    store.put(block)
    assert store.get("vol-1") == block
    assert [a.volume_id for a in store.all()] == ["vol-1"]
    assert block.fs_type == "" and block.device_path == ""


def test_remove_forgets_and_says_whether_there_was_a_record(store: AttachmentStore):
    store.put(iscsi("vol-1"))
    store.put(iscsi("vol-2"))
    assert store.remove("vol-1") is True
    assert store.remove("vol-1") is False
    assert store.get("vol-1") is None
    assert [a.volume_id for a in store.all()] == ["vol-2"]


def test_all_lists_every_record_oldest_first(store: AttachmentStore):
    assert store.all() == []
    records = [iscsi(f"vol-{i}") for i in range(5)]
    for i, a in enumerate(records):
        a.created_at = 1_700_000_000.0 + (5 - i)  # newest put first
        store.put(a)
    assert store.all() == list(reversed(records))


def test_records_survive_reopening_the_file(tmp_path: Path):
    first = AttachmentStore.in_state_dir(tmp_path / "state")
    a, b = iscsi("vol-1"), iscsi("vol-2")
    first.put(a)
    # Seen by another store on the same file while the first one is still open (WAL), and after close.
    with AttachmentStore(first.path) as second:
        assert second.get("vol-1") == a
        second.put(b)
    assert first.get("vol-2") == b
    first.close()
    with AttachmentStore.in_state_dir(tmp_path / "state") as third:
        assert third.all() == [a, b]


def test_schema_is_versioned_and_a_newer_file_is_refused(tmp_path: Path):
    path = tmp_path / FILENAME
    AttachmentStore(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        AttachmentStore(path)
    assert path.stat().st_mode & 0o077 == 0


def test_a_row_written_by_the_previous_version_reads_the_same(tmp_path: Path):
    """Rows of schema version 1 written before ``extra`` was dropped from the record: its column is ignored."""
    path = tmp_path / FILENAME
    AttachmentStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO attachments (volume_id, staging_path, access_type, fs_type, connection_info, device_info, "
            "device_path, created_at, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                "vol-old",
                "/staging/vol-old",
                "block",
                "",
                '{"driver_volume_type": "local", "data": {"device_path": "/dev/loop3"}}',
                '{"path": "/dev/loop3", "type": "local"}',
                "/dev/loop3",
                1_700_000_000.0,
                '{"note": "written by the previous version"}',
            ),
        )
    with AttachmentStore(path) as store:
        assert store.all() == [
            Attachment(
                volume_id="vol-old",
                staging_path="/staging/vol-old",
                access_type="block",
                connection_info={"driver_volume_type": "local", "data": {"device_path": "/dev/loop3"}},
                device_info={"path": "/dev/loop3", "type": "local"},
                device_path="/dev/loop3",
                created_at=1_700_000_000.0,
            )
        ]
        store.put(iscsi("vol-new"))
    with sqlite3.connect(path) as db:  # what the previous version reads of a new row
        assert db.execute("SELECT extra FROM attachments WHERE volume_id = 'vol-new'").fetchone() == ("{}",)


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="access_type"):
        Attachment("vol-1", "/staging", "filesystem")
    with pytest.raises(ValueError, match="volume id"):
        Attachment("", "/staging", "mount")


def test_concurrent_puts_from_20_threads_on_one_store_and_on_separate_stores(tmp_path: Path):
    shared = AttachmentStore.in_state_dir(tmp_path)
    barrier = threading.Barrier(20)
    failures: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            own = AttachmentStore.in_state_dir(tmp_path) if i % 2 else None
            for j in range(10):
                (own or shared).put(iscsi(f"vol-{i}-{j}"))
                assert shared.get(f"vol-{i}-{j}") is not None
            if own:
                own.close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(shared.all()) == 200
    shared.close()
    with AttachmentStore.in_state_dir(tmp_path) as again:
        assert {a.volume_id for a in again.all()} == {f"vol-{i}-{j}" for i in range(20) for j in range(10)}
        stored = again.get("vol-7-3")
        assert stored is not None and stored.connection_info == iscsi("vol-7-3").connection_info


def test_secret_looking_entries_never_reach_the_file(tmp_path: Path):
    a = iscsi("vol-1")
    a.connection_info["data"].update(
        {
            "auth_method": "CHAP",
            "auth_username": "chap-user-visible",
            "auth_password": CHAP_PASSWORD,
            "discovery_auth_password": CHAP_PASSWORD + "-discovery",
            "keyring": KEYRING,
            "nested": {"secret_key": "nested-secret-value-42", "keep": "kept-value"},
            "comment": f"pw={REGISTERED}",
        }
    )
    with AttachmentStore.in_state_dir(tmp_path) as store:
        store.put(a)
        stored = store.get("vol-1")
        raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(FILENAME))
    data = stored.connection_info["data"]
    assert not {"auth_password", "discovery_auth_password", "keyring", "comment"} & set(data)
    assert data["nested"] == {"keep": "kept-value"}
    assert data["auth_username"] == "chap-user-visible"
    assert stored.device_info == a.device_info
    for value in (
        CHAP_PASSWORD,
        "AQBnodeStoreKeyringValue",
        "nested-secret-value-42",
        REGISTERED,
    ):
        assert value.encode() not in raw, value
    for value in ("chap-user-visible", "kept-value"):  # the grep does see stored text
        assert value.encode() in raw, value
    assert a.connection_info["data"]["auth_password"] == CHAP_PASSWORD  # the caller's object is untouched


def test_importing_the_store_loads_no_os_brick_oslo_grpc_or_cinder():
    code = (
        "import sys, mbs_csi.node.store; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('os_brick', 'oslo_config', 'oslo_privsep', 'eventlet', 'grpc', 'cinder', 'cinderlib')); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
