"""The command line: version, and help for each subcommand."""

from __future__ import annotations

import pytest

import mbs_csi
from testkit.driver import run_cli


def test_version():
    result = run_cli("version")
    assert result.returncode == 0
    assert result.stdout == f"mbs-csi {mbs_csi.__version__} (CSI spec 1.12.0)\n"


def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout and "version" in result.stdout


@pytest.mark.parametrize(
    "flag",
    [
        "--role",
        "--endpoint",
        "--config",
        "--state-dir",
        "--database",
        "--workers",
        "--grace-period",
        "--log-level",
        "--driver-name",
        "--node-id",
        "--topology",
    ],
)
def test_serve_help_documents_each_flag(flag):
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    assert flag in result.stdout


def test_no_subcommand_is_a_usage_error():
    result = run_cli()
    assert result.returncode == 2
    assert "usage: mbs-csi" in result.stderr
