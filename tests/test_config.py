"""Config: defaults, precedence, and one clear error (exit code 2) per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mbs_csi import config, mutable_parameters
from mbs_csi.errors import ConfigError
from testkit.driver import driver_env, run_cli

RBD = {
    "name": "ceph",
    "volume_driver": "cinder.volume.drivers.rbd.RBDDriver",
    "driver_options": {"rbd_pool": "volumes", "rbd_max_clone_depth": 0},
    "driver_sensitive_options": {"rbd_secret_uuid": "s3cr3t-uuid-value"},
    "topology": {"topology.mbs.csi.io/zone": "a"},
}


def write(tmp_path: Path, data: object, name: str = "mbs.yaml") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else _yaml(data))
    return str(path)


def _yaml(data: object) -> str:
    import yaml

    return yaml.safe_dump(data)


def test_embedded_default_is_all_roles_sqlite_and_loopback_under_the_state_dir():
    settings = config.load_settings(env={}, flags={"state_dir": "/srv/mbs"})
    assert settings.role == "all"
    assert settings.endpoint == config.Endpoint("unix", "/run/mbs-csi/csi.sock")
    assert settings.database == "sqlite:////srv/mbs/mbs-csi.sqlite"
    assert [b.name for b in settings.backends] == ["loopback"]
    assert settings.backends[0].volume_driver == config.LOOPBACK_DRIVER
    assert settings.backends[0].driver_options["loopback_dir"] == "/srv/mbs/loopback"
    assert settings.default_backend == "loopback"
    assert not settings.has_topology


@pytest.mark.parametrize("name", ["mbs.yaml", "mbs.json"])
def test_file_is_read_as_yaml_or_json(tmp_path, name):
    path = write(tmp_path, {"role": "controller", "workers": 4, "backends": [RBD]}, name)
    settings = config.load_settings(path, env={})
    assert settings.role == "controller"
    assert settings.workers == 4
    backend = settings.backend(None)
    assert backend.name == "ceph"
    assert backend.all_options() == {
        "rbd_pool": "volumes",
        "rbd_max_clone_depth": 0,
        "rbd_secret_uuid": "s3cr3t-uuid-value",
    }
    assert settings.has_topology


def test_environment_overrides_file_and_flags_override_environment(tmp_path):
    path = write(tmp_path, {"role": "controller", "workers": 4, "log_level": "WARNING"})
    env = {"MBS_CSI_WORKERS": "8", "MBS_CSI_LOG_LEVEL": "debug", "CSI_ENDPOINT": "unix:///csi/csi.sock"}
    settings = config.load_settings(path, env=env, flags={"workers": "2", "role": None})
    assert settings.role == "controller"  # from the file; the flag was not given
    assert settings.workers == 2  # flag beats env beats file
    assert settings.log_level == "DEBUG"  # env beats file, case-insensitive
    assert settings.endpoint == config.Endpoint("unix", "/csi/csi.sock")


def test_config_path_can_come_from_the_environment(tmp_path):
    path = write(tmp_path, {"driver_name": "block.example.com"})
    assert config.load_settings(env={"MBS_CSI_CONFIG": path}).driver_name == "block.example.com"


def test_kubernetes_service_variables_are_not_mistaken_for_settings():
    env = {"MBS_CSI_METRICS_SERVICE_HOST": "10.0.0.1", "MBS_CSI_PORT": "tcp://10.0.0.1:9808"}
    assert config.load_settings(env=env).role == "all"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:///csi/csi.sock", config.Endpoint("unix", "/csi/csi.sock")),
        ("unix:/csi/csi.sock", config.Endpoint("unix", "/csi/csi.sock")),
        ("tcp://127.0.0.1:10000", config.Endpoint("tcp", "127.0.0.1:10000")),
        ("localhost:10000", config.Endpoint("tcp", "localhost:10000")),
        ("[::1]:10000", config.Endpoint("tcp", "[::1]:10000")),
    ],
)
def test_endpoint_forms(text, expected):
    assert config.parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["unix://", "localhost", "host:port", "10000", "host:99999"])
def test_bad_endpoints_are_refused(text):
    with pytest.raises(ValueError):
        config.parse_endpoint(text)


def test_topology_from_a_flag():
    settings = config.load_settings(env={}, flags={"topology": "zone=a, rack=r1"})
    assert dict(settings.topology) == {"zone": "a", "rack": "r1"}
    assert settings.has_topology


def test_sensitive_values_never_show_in_repr_or_describe(tmp_path):
    data = {"backends": [RBD], "database": "postgresql://mbs:pg-pa55word@db:5432/mbs"}
    settings = config.load_settings(write(tmp_path, data), env={})
    shown = repr(settings) + str(settings.describe()) + repr(settings.backends[0])
    assert "s3cr3t-uuid-value" not in shown
    assert "pg-pa55word" not in shown
    assert settings.describe()["backends"][0]["driver_sensitive_options"] == {"rbd_secret_uuid": "***"}
    assert settings.database_display == "postgresql://mbs:***@db:5432/mbs"


# --- bad input: each gives ConfigError naming source, key and expectation ---------------------------

BAD_FILES = [
    ({"rol": "all"}, "key 'rol': unknown key; expected one of role,"),
    ({"workers": "ten"}, "key 'workers': expected an integer >= 1, got 'ten' (str)"),
    ({"workers": 0}, "key 'workers': expected an integer >= 1"),
    ({"grace_period": "soon"}, "key 'grace_period': expected a number of seconds >= 0"),
    ({"role": "both"}, "key 'role': expected one of controller, node, all, got 'both'"),
    ({"log_level": "LOUD"}, "key 'log_level': expected one of DEBUG, INFO, WARNING, ERROR"),
    ({"endpoint": "csi.sock"}, "key 'endpoint': expected unix:///path/to/csi.sock"),
    ({"driver_name": "-bad-"}, "key 'driver_name': expected a domain-name style name"),
    ({"state_dir": "relative/dir"}, "key 'state_dir': expected an absolute directory path"),
    ({"topology": ["zone=a"]}, "key 'topology': expected a mapping of topology keys"),
    ({"backends": {"name": "x"}}, "key 'backends': expected a list of backends"),
    ({"backends": [{"name": "x"}]}, "key 'backends[0].volume_driver': missing; expected the Python path"),
    ({"backends": [{"name": "x", "volume_driver": "RBD"}]}, "key 'backends[0].volume_driver': expected the Python"),
    ({"backends": [{"volume_driver": "a.B"}]}, "key 'backends[0].name': missing or invalid"),
    ({"backends": [{"name": "x", "volume_driver": "a.B", "pool": "p"}]}, "key 'backends[0].pool': unknown key"),
    (
        {"backends": [{"name": "x", "volume_driver": "a.B", "driver_options": ["a"]}]},
        "key 'backends[0].driver_options': expected a mapping",
    ),
    (
        {"backends": [{"name": "x", "volume_driver": "a.B", "driver_options": {"o": {"deep": 1}}}]},
        "key 'backends[0].driver_options.o': expected a string, number, boolean or list",
    ),
    (
        {"backends": [{"name": "x", "volume_driver": "a.B", "driver_sensitive_options": {"pw": ["hunter2x"]}}]},
        "key 'backends[0].driver_sensitive_options.pw': expected a string, got a value of type list",
    ),
    (
        {
            "backends": [
                {
                    "name": "x",
                    "volume_driver": "a.B",
                    "driver_options": {"pw": "a"},
                    "driver_sensitive_options": {"pw": "b"},
                }
            ]
        },
        "key 'backends[0].driver_sensitive_options.pw': also set in driver_options",
    ),
    (
        {"backends": [{"name": "x", "volume_driver": "a.B"}, {"name": "x", "volume_driver": "a.C"}]},
        "key 'backends[1].name': duplicate backend name 'x'",
    ),
    (
        {"default_backend": "y", "backends": [{"name": "x", "volume_driver": "a.B"}]},
        "key 'default_backend': no backend called 'y'; configured: x",
    ),
    (
        {"backends": [{"name": "x", "volume_driver": "a.B", "mutable_parameters": "total_iops_sec"}]},
        "key 'backends[0].mutable_parameters': expected a list of parameter names",
    ),
    (["role", "all"], "expected a mapping of settings at the top, got list"),
]


@pytest.mark.parametrize(("data", "message"), BAD_FILES)
def test_bad_file_content_is_refused_with_source_key_and_expectation(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        config.load_settings(path, env={})
    assert str(caught.value).startswith(path + ":")
    assert message in str(caught.value)
    assert "hunter2x" not in str(caught.value)


def test_mutable_parameters_default_to_what_the_driver_applies_unless_listed(tmp_path):
    listed = {**RBD, "name": "listed", "mutable_parameters": ["total_iops_sec", "replication_enabled"]}
    other = {"name": "other", "volume_driver": "vendor.drivers.Array"}
    settings = config.load_settings(write(tmp_path, {"backends": [RBD, listed, other]}), env={})
    assert settings.backend("ceph").mutable_parameters == mutable_parameters.QOS_LIMITS
    assert settings.backend("listed").mutable_parameters == ("total_iops_sec", "replication_enabled")
    assert settings.backend("other").mutable_parameters == ()  # an unknown driver: only what is listed
    assert config.load_settings(env={}).backends[0].mutable_parameters == mutable_parameters.QOS_LIMITS
    assert settings.backend("listed").describe()["mutable_parameters"] == ["total_iops_sec", "replication_enabled"]


def test_unparseable_yaml_names_the_line(tmp_path):
    path = tmp_path / "mbs.yaml"
    path.write_text("role: all\nbackends: [\n  - name: x\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+ column \d+"):
        config.load_settings(str(path), env={})


def test_unparseable_json_names_the_line(tmp_path):
    path = tmp_path / "mbs.json"
    path.write_text('{"role": "all",\n "workers": }')
    with pytest.raises(ConfigError, match="not valid JSON at line 2 column"):
        config.load_settings(str(path), env={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the config file: .*No such file"):
        config.load_settings(str(tmp_path / "absent.yaml"), env={})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"^environment MBS_CSI_WORKERS: key 'workers': expected an integer"):
        config.load_settings(env={"MBS_CSI_WORKERS": "many"})


def test_bad_database_value_is_not_echoed(tmp_path):
    path = write(tmp_path, {"database": ["postgresql://u:topsecret@h/db"]})
    with pytest.raises(ConfigError, match="key 'database': expected an SQLAlchemy URL") as caught:
        config.load_settings(path, env={})
    assert "topsecret" not in str(caught.value)


# --- through the command: exit code 2 and the message on stderr -------------------------------------


@pytest.mark.parametrize(("data", "message"), BAD_FILES[:4] + BAD_FILES[11:12])
def test_serve_exits_2_on_bad_config(tmp_path, data, message):
    path = write(tmp_path, data)
    result = run_cli("serve", "--config", path, "--endpoint", f"unix://{tmp_path}/csi.sock")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"mbs-csi: configuration error: {path}: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "csi.sock").exists()


def test_serve_exits_2_on_bad_flag_and_bad_env(tmp_path):
    result = run_cli("serve", "--workers", "zero")
    assert result.returncode == 2
    assert "flag --workers: key 'workers': expected an integer >= 1, got 'zero'" in result.stderr
    result = run_cli("serve", env=driver_env(CSI_ENDPOINT="nowhere"))
    assert result.returncode == 2
    assert "environment CSI_ENDPOINT: key 'endpoint': expected unix:///" in result.stderr


# --- sensitive options from a directory (a Kubernetes Secret mounted as a volume) -------------------


def _secret_volume(tmp_path: Path, files: dict[str, str]) -> Path:
    """A directory laid out like a mounted Secret: the keys, plus Kubernetes' own dot-entries."""
    directory = tmp_path / "secrets"
    (directory / "..2026_11_25_10_00_00.1").mkdir(parents=True)
    (directory / "..data").symlink_to("..2026_11_25_10_00_00.1")
    for name, value in files.items():
        (directory / name).write_text(value)
    return directory


def test_sensitive_options_dir_adds_each_file_to_its_backend(tmp_path):
    directory = _secret_volume(tmp_path, {"ceph.rbd_keyring_conf": "key-from-secret\n"})
    data = {"backends": [RBD, {"name": "other", "volume_driver": "a.b.C"}]}
    settings = config.load_settings(write(tmp_path, data), env={"MBS_CSI_SENSITIVE_OPTIONS_DIR": str(directory)})
    ceph, other = settings.backends
    assert ceph.all_options()["rbd_keyring_conf"] == "key-from-secret"
    assert ceph.all_options()["rbd_secret_uuid"] == "s3cr3t-uuid-value"
    assert other.driver_sensitive_options == {}
    assert "key-from-secret" not in repr(settings) + str(settings.describe())


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"nosuch.san_password": "x"}, "'nosuch.san_password': expected a file named <backend>.<option>"),
        ({"ceph.rbd_pool": "x"}, "'ceph.rbd_pool': option rbd_pool is also set in driver_options"),
        ({"ceph.rbd_user": ""}, "'ceph.rbd_user': the file is empty"),
    ],
)
def test_bad_sensitive_options_dir_is_refused(tmp_path, files, message):
    directory = _secret_volume(tmp_path, files)
    with pytest.raises(ConfigError, match="sensitive_options_dir") as caught:
        config.load_settings(
            write(tmp_path, {"backends": [RBD]}), env={"MBS_CSI_SENSITIVE_OPTIONS_DIR": str(directory)}
        )
    assert message in str(caught.value)


def test_missing_sensitive_options_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot list the directory"):
        config.load_settings(env={"MBS_CSI_SENSITIVE_OPTIONS_DIR": str(tmp_path / "absent")})


def test_connector_store_and_metrics_endpoint(tmp_path):
    settings = config.load_settings(
        write(tmp_path, {"connector_store": "kubernetes", "kubeconfig": "/root/.kube/config"}),
        env={"MBS_CSI_METRICS_ENDPOINT": ":9810"},
    )
    assert (settings.connector_store, settings.metrics_endpoint) == ("kubernetes", ":9810")
    assert settings.kubeconfig == Path("/root/.kube/config")
    assert config.load_settings(env={}).connector_store == "database"
    with pytest.raises(ConfigError, match="expected one of database, kubernetes"):
        config.load_settings(env={"MBS_CSI_CONNECTOR_STORE": "etcd"})
    with pytest.raises(ConfigError, match="expected host:port"):
        config.load_settings(env={"MBS_CSI_METRICS_ENDPOINT": "9810"})


def test_readme_table_is_the_one_generated_from_the_declarations():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert config.reference_table() in readme, (
        "README.md's configuration table differs from mbs_csi/config.py; paste the output of "
        "python -c 'from mbs_csi import config; print(config.reference_table())'"
    )


def test_every_key_has_a_flag_an_environment_variable_and_a_described_value(tmp_path):
    """Each declared key is read from the file, the environment and its flag, and shows in describe()."""
    values = {"workers": ("7", 7), "log_level": ("debug", "DEBUG"), "kubeconfig": ("/k/c", Path("/k/c"))}
    for key, (text, parsed) in values.items():
        env_name = "MBS_CSI_" + key.upper()
        assert getattr(config.load_settings(env={env_name: text}), key) == parsed
        assert getattr(config.load_settings(flags={key: text}), key) == parsed
    described = config.load_settings().describe()
    assert set(described) == {*config.OPTIONS, "backends"}
    help_text = run_cli("serve", "--help").stdout
    for key in config.OPTIONS:
        assert "--" + key.replace("_", "-") in help_text
