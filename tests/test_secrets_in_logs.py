"""Sensitive values placed in the config never appear in the driver's log, even at DEBUG level and on
error paths that print the database URL or the backend definitions."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from mbs_csi import config, secrets
from testkit.driver import running_driver
from testkit.host import free_port, short_tmpdir

SAN_PASSWORD = "xtremio-Pa55w0rd!"
CHAP_SECRET = "chap-0123456789ab"
DB_PASSWORD = "db-hunter2-pw"


def test_no_secret_from_the_config_reaches_the_log():
    workdir = short_tmpdir()
    path = workdir / "mbs.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "role": "all",
                "log_level": "DEBUG",
                "database": f"postgresql://mbs:{DB_PASSWORD}@127.0.0.1:{free_port()}/mbs",
                "backends": [
                    {
                        "name": "xtremio",
                        "volume_driver": "cinder.volume.drivers.dell_emc.xtremio.XtremIOISCSIDriver",
                        "driver_options": {"san_ip": "192.0.2.10", "san_login": "admin"},
                        "driver_sensitive_options": {"san_password": SAN_PASSWORD, "chap_secret": CHAP_SECRET},
                    }
                ],
            }
        )
    )
    try:
        with running_driver("--config", str(path), workdir=workdir) as driver:
            assert driver.probe() is False  # the database is down: its URL is logged with the reason
            assert driver.stop() == 0
            log = driver.log()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert "san_login" in log and "'san_password': '***'" in log  # the settings were dumped...
    assert "postgresql://mbs:***@127.0.0.1" in log
    for secret in (SAN_PASSWORD, CHAP_SECRET, DB_PASSWORD):  # ...without a single secret
        assert secret not in log


def test_a_bad_sensitive_value_is_described_not_echoed(tmp_path):
    path = tmp_path / "mbs.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "backends": [
                    {
                        "name": "x",
                        "volume_driver": "a.B",
                        "driver_sensitive_options": {"san_password": {SAN_PASSWORD: 1}},
                    }
                ]
            }
        )
    )
    try:
        config.load_settings(str(path), env={})
    except config.ConfigError as exc:
        assert SAN_PASSWORD not in str(exc)
        assert "got a value of type dict" in str(exc)
    else:
        raise AssertionError("accepted a mapping as a password")


@pytest.mark.parametrize(
    ("name", "content", "secret"),
    [
        # A Ceph keyring: its key is a "name = value" line.
        (
            "ceph.client.cinder.keyring",
            '[client.cinder]\n\tkey = AQBoZ2ZpbGUtc2VjcmV0LXRlc3Q9PQ==\n\tcaps mon = "profile rbd"\n',
            "AQBoZ2ZpbGUtc2VjcmV0LXRlc3Q9PQ==",
        ),
        # A private key: no such line, so the content is masked whole, in each quoting.
        (
            "san.key",
            "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC-file-secrets-test\n"
            "-----END PRIVATE KEY-----\n",
            "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-file-secrets-test",
        ),
    ],
)
def test_a_secret_file_is_scrubbed_however_a_driver_prints_it(tmp_path, name, content, secret):
    path = tmp_path / name
    path.write_text(content)
    secrets.register_all(secrets.file_secrets(str(path)))
    # Cinder's RBD driver logs its connection info as a dict (repr); cinderlib stores it as JSON.
    for printed in (f"connection data: { {'data': {'keyring': content}} }", json.dumps({"key": content}), content):
        assert secret not in secrets.scrub(printed)


def test_an_unreadable_secret_file_gives_nothing_to_scrub(tmp_path):
    assert secrets.file_secrets(str(tmp_path / "missing.keyring")) == []
