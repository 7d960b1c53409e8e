"""``mbs-csi backend check`` through the real command, real cinderlib and real drivers."""

from __future__ import annotations

import json

import yaml

from mbs_csi import config
from testkit.driver import run_cli
from testkit.host import free_port

SAN_PASSWORD = "check-Pa55word-value"


def write_config(tmp_path, backends, **extra) -> str:
    path = tmp_path / "mbs.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "backends": backends, **extra}))
    return str(path)


def loopback(name: str, directory: str, **extra) -> dict:
    return {
        "name": name,
        "volume_driver": config.LOOPBACK_DRIVER,
        "driver_options": {"loopback_dir": directory},
        **extra,
    }


def test_healthy_and_broken_backends_are_reported_with_secrets_masked(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    path = write_config(
        tmp_path,
        [
            loopback("good", str(tmp_path / "good")),
            loopback(
                "bad-dir", str(tmp_path / "a-file" / "sub"), driver_sensitive_options={"san_password": SAN_PASSWORD}
            ),
            {"name": "no-driver", "volume_driver": "cinder.volume.drivers.nope.NopeDriver"},
        ],
    )
    result = run_cli("backend", "check", "--config", path, timeout=120)
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert "good: OK" in out and "protocol: local, vendor: mbs-csi" in out and "thin provisioning: yes" in out
    assert "bad-dir: FAILED" in out and "san_password=***" in out
    assert "no-driver: FAILED" in out and "No module named 'cinder.volume.drivers.nope'" in out
    assert SAN_PASSWORD not in out + result.stderr


def test_named_backends_only_and_json(tmp_path):
    path = write_config(tmp_path, [loopback("one", str(tmp_path / "one")), {"name": "broken", "volume_driver": "x.Y"}])
    result = run_cli("backend", "check", "--config", path, "--json", "one", timeout=120)
    assert result.returncode == 0, result.stderr
    [report] = json.loads(result.stdout)
    assert report["name"] == "one" and report["ok"] is True and report["error"] is None
    assert report["stats"]["total_capacity_gb"] > 0 and report["stats"]["multiattach"] is False


def test_unknown_backend_name_is_a_usage_error(tmp_path):
    path = write_config(tmp_path, [loopback("one", str(tmp_path / "one"))])
    result = run_cli("backend", "check", "--config", path, "two")
    assert result.returncode == 2
    assert "unknown backend(s) two; configured: one" in result.stderr


def test_unreachable_database_fails_every_backend_with_the_reason(tmp_path):
    url = f"postgresql://mbs:db-secret-pw@127.0.0.1:{free_port()}/mbs"
    path = write_config(tmp_path, [loopback("one", str(tmp_path / "one"))], database=url)
    result = run_cli("backend", "check", "--config", path, timeout=120)
    assert result.returncode == 1
    assert "one: FAILED" in result.stdout and "cannot initialise cinderlib" in result.stdout
    assert "db-secret-pw" not in result.stdout + result.stderr
