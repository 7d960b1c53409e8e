"""Connection info <-> publish_context: lossless for what travels, and no secret travels."""

from __future__ import annotations

import json

import pytest

from mbs_csi import secrets
from mbs_csi.publish_context import from_publish_context, to_publish_context
from mbs_csi.secrets import is_secret_name

CHAP_PASSWORD = "chap-pw-0123456789"
secrets.register(CHAP_PASSWORD)

ISCSI = {
    "driver_volume_type": "iscsi",
    "data": {
        "target_iqn": "iqn.2010-10.org.openstack:volume-1",
        "target_portal": "192.0.2.5:3260",
        "target_lun": 1,
        "target_discovered": False,
        "auth_method": "CHAP",
        "auth_username": "user",
        "auth_password": CHAP_PASSWORD,
        "discovery_auth_password": "another-secret",
        "qos_specs": None,
        "access_mode": "rw",
    },
}


def test_secrets_are_withheld_and_named_everything_else_travels_as_strings():
    context = to_publish_context(ISCSI)
    assert all(isinstance(v, str) for v in context.values())
    assert context["mbs.secret_keys"] == "auth_password,discovery_auth_password"
    assert "auth_password" not in context and "discovery_auth_password" not in context
    assert context["target_lun"] == "1" and context["target_discovered"] == "false"
    assert context["auth_username"] == "user"
    assert not any(CHAP_PASSWORD in v or "another-secret" in v for v in context.values())


def test_the_node_rebuilds_the_exact_connection_info_from_context_and_stage_secrets():
    context = to_publish_context(ISCSI)
    stage = {"auth_password": CHAP_PASSWORD, "discovery_auth_password": "another-secret"}
    assert secrets.revealed(from_publish_context(context, stage)) == ISCSI


def test_a_missing_stage_secret_is_named():
    with pytest.raises(KeyError, match="auth_password"):
        from_publish_context(to_publish_context(ISCSI), {"discovery_auth_password": "x"})


def test_a_registered_secret_hidden_under_an_innocent_name_or_deep_inside_is_withheld():
    info = {
        "driver_volume_type": "x",
        "data": {"comment": f"pw={CHAP_PASSWORD}", "nested": {"auth": {"token": "t"}}, "hosts": ["a", "b"]},
    }
    context = to_publish_context(info)
    assert context["mbs.secret_keys"] == "comment,nested"
    assert json.loads(context["hosts"]) == ["a", "b"]


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "auth_password",
        "keyring",
        "token",
        "access_key",
        "key",
        "client_secret",
        "secret",
        "private_key",
        "credentials",
        "passwd",
    ],
)
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "secret_uuid",
        "secret_type",
        "auth_username",
        "name",
        "target_iqn",
        "hosts",
        "volume_id",
        "encrypted",
        "monkey",
    ],
)
def test_innocent_names(name):
    assert not is_secret_name(name)
