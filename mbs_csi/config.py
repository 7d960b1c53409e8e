"""Typed settings from a YAML/JSON file, ``MBS_CSI_*`` environment variables and command-line flags.

Precedence, lowest first: built-in defaults, the config file, the environment, flags. Everything is
validated once, at start: an unknown key, a missing ``volume_driver`` or a value of the wrong type
raises :class:`~mbs_csi.errors.ConfigError` naming the source, the key and what was expected, and the
CLI exits with code 2.

Unknown ``MBS_CSI_*`` environment variables are ignored on purpose: Kubernetes injects
``<SERVICE>_SERVICE_HOST``/``_PORT`` variables for every Service in the namespace, and a Service named
``mbs-csi-...`` produces ``MBS_CSI_...`` names the driver must not choke on.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, cast

import yaml

from mbs_csi import mutable_parameters, secrets
from mbs_csi.errors import ConfigError

ROLES = ("controller", "node", "all")
CONNECTOR_STORES = ("database", "kubernetes")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_ENDPOINT = "unix:///run/mbs-csi/csi.sock"
DEFAULT_STATE_DIR = "/var/lib/mbs-csi"
DEFAULT_DRIVER_NAME = "mbs.csi.io"
LOOPBACK_DRIVER = "mbs_csi.drivers.loopback.LoopbackDriver"
LOOPBACK_BACKEND_NAME = "loopback"

# CSI: plugin names are domain-name style, at most 63 characters, alphanumeric at both ends.
_DRIVER_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9.]{0,61}[A-Za-z0-9])?$")
_BACKEND_NAME_RE = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,62}$")
_CLASS_PATH_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_NODE_ID_MAX_BYTES = 256  # CSI limit on node_id

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """Where the gRPC server listens: a unix socket path or a TCP ``host:port``."""

    scheme: str  # "unix" or "tcp"
    address: str  # socket path, or host:port

    @property
    def grpc_target(self) -> str:
        return f"unix://{self.address}" if self.scheme == "unix" else self.address

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}"


def parse_endpoint(text: str) -> Endpoint:
    """Accept ``unix:///path``, ``unix:/path``, ``tcp://host:port`` and ``host:port``."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        path = "/" + path.lstrip("/")
        if path == "/":
            raise ValueError("a unix endpoint needs a socket path, e.g. unix:///csi/csi.sock")
        return Endpoint("unix", path)
    address = text.removeprefix("tcp://")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected unix:///path/to.sock, tcp://host:port or host:port")
    return Endpoint("tcp", address)


@dataclass(frozen=True)
class Backend:
    """A storage backend: a Cinder volume driver and its options (a "storage domain" in the seed)."""

    name: str
    volume_driver: str
    driver_options: Mapping[str, Any] = field(default_factory=dict)
    driver_sensitive_options: Mapping[str, secrets.Secret] = field(default_factory=dict)
    topology: Mapping[str, str] = field(default_factory=dict)
    # Keys ControllerModifyVolume and CreateVolume's mutable_parameters may set (mutable_parameters.py).
    mutable_parameters: tuple[str, ...] = ()
    max_volumes_per_node: int = 0  # volumes of this backend one node may have published (0: no limit)

    def all_options(self) -> dict[str, Any]:
        """Plain and sensitive options together, secrets revealed: for handing to the driver only."""
        merged = dict(self.driver_options)
        merged.update({k: v.reveal() for k, v in self.driver_sensitive_options.items()})
        return merged

    def describe(self) -> dict[str, Any]:
        """A loggable view: sensitive values masked."""
        return {
            "name": self.name,
            "volume_driver": self.volume_driver,
            "driver_options": dict(self.driver_options),
            "driver_sensitive_options": secrets.masked(self.driver_sensitive_options),
            "topology": dict(self.topology),
            "mutable_parameters": list(self.mutable_parameters),
            "max_volumes_per_node": self.max_volumes_per_node,
        }


# --- parsing one value: from a file (already typed by YAML/JSON) or from env/flag text ---------------
# Each raises TypeError or ValueError for a bad value; the caller turns that into a ConfigError.


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    return value


def _not_negative(value: int) -> int:
    if value < 0:
        raise ValueError
    return value


def _positive(value: int) -> int:
    if value < 1:
        raise ValueError
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TypeError
    return float(value)


def _at_least_1s(value: Any) -> float:
    seconds = _seconds(value)
    if seconds < 1:
        raise ValueError
    return seconds


def _choice(choices: tuple[str, ...], upper: bool = False) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _str(value)
        text = text.upper() if upper else text
        if text not in choices:
            raise ValueError
        return text

    return check


def _labels_text(text: str) -> dict[str, str]:
    """``zone=a,rack=r1`` -> {"zone": "a", "rack": "r1"}"""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise ValueError
    return {k.strip(): v.strip() for k, v in pairs}


def _labels(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError
    if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()):
        raise TypeError
    return dict(value)


def _endpoint(value: Any) -> Endpoint:
    return parse_endpoint(_str(value))


def _host_port(value: Any) -> str:
    _host, sep, port = _str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError
    return value


def _driver_name(value: Any) -> str:
    if not _DRIVER_NAME_RE.match(_str(value)):
        raise ValueError
    return value


def _node_id(value: Any) -> str:
    if len(_str(value).encode()) > _NODE_ID_MAX_BYTES:
        raise ValueError
    return value


def _abs_path(value: Any) -> Path:
    path = Path(_str(value))
    if not path.is_absolute():
        raise ValueError
    return path


# --- the settings: each key declared once ----------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """Everything about one setting but its name and type (the Settings field's): how to read it from a
    file and from env/flag text, what to tell a person, and whether its value may be shown."""

    help: str  # what it means: the CLI help and the README table
    expected: str  # what a person should write, for error messages
    from_file: Callable[[Any], Any]  # checks a value already typed by YAML/JSON
    from_text: Callable[[str], Any]  # parses an env/flag string
    default_text: str  # the default as a person reads it (help, README)
    env: str = ""  # the environment variable, when not MBS_CSI_<KEY>
    sensitive: bool = False  # may hold a secret: never echoed in an error; describe() redacts it


def setting(
    default: T | None,
    help: str,
    expected: str,
    check: Callable[[Any], Any],
    *,
    from_text: Callable[[str], Any] | None = None,
    default_text: str | None = None,
    env: str = "",
    sensitive: bool = False,
    factory: Callable[[], T] | None = None,
) -> T:
    """A Settings field with its :class:`Option`: the default (or a ``factory`` making it), the help, and
    how to read a value. ``check`` validates a file value; env and flag text goes through ``from_text``,
    by default ``check`` itself (right for strings)."""
    option = Option(
        help=help,
        expected=expected,
        from_file=check,
        from_text=from_text or check,
        default_text=default_text if default_text is not None else f"`{default}`",
        env=env,
        sensitive=sensitive,
    )
    metadata = {"option": option}
    if factory is not None:
        return field(default_factory=factory, repr=not sensitive, metadata=metadata)
    return field(default=cast(T, default), repr=not sensitive, metadata=metadata)


def _int_text(check: Callable[[int], int]) -> Callable[[str], int]:
    return lambda text: check(int(text))


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError
    return value


def _bool_text(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError
    return lowered in ("true", "1", "yes")


def _seconds_text(check: Callable[[Any], float]) -> Callable[[str], float]:
    return lambda text: check(float(text))


@dataclass(frozen=True)
class Settings:
    role: str = setting("all", "`controller`, `node` or `all`", "one of " + ", ".join(ROLES), _choice(ROLES))
    endpoint: Endpoint = setting(
        parse_endpoint(DEFAULT_ENDPOINT),
        "where to serve gRPC: `unix:///path/csi.sock` or `host:port`",
        "unix:///path/to/csi.sock, tcp://host:port or host:port",
        _endpoint,
        env="CSI_ENDPOINT",
    )
    driver_name: str = setting(
        DEFAULT_DRIVER_NAME,
        "CSI driver name (domain-name style)",
        "a domain-name style name of at most 63 characters, e.g. mbs.csi.io",
        _driver_name,
    )
    node_id: str = setting(
        None,
        "this node's id",
        f"a non-empty string of at most {_NODE_ID_MAX_BYTES} bytes",
        _node_id,
        default_text="host name",
        factory=socket.gethostname,
    )
    state_dir: Path = setting(
        Path(DEFAULT_STATE_DIR),
        "embedded database, loopback backend, node state",
        "an absolute directory path",
        _abs_path,
    )
    # An SQLAlchemy URL may embed a password: kept out of repr and shown redacted (database_display).
    database: str = setting(
        "",  # SQLite under the state dir, filled in by load_settings
        "SQLAlchemy URL of the controller's database (PostgreSQL for several replicas)",
        "an SQLAlchemy URL, e.g. postgresql://user:password@host/db",
        _str,
        default_text="`sqlite:///<state_dir>/mbs-csi.sqlite`",
        sensitive=True,
    )
    workers: int = setting(
        16, "gRPC worker threads", "an integer >= 1", lambda v: _positive(_int(v)), from_text=_int_text(_positive)
    )
    backend_workers: int = setting(
        4,
        "controller: cinderlib worker processes (the most backend calls at once)",
        "an integer >= 1",
        lambda v: _positive(_int(v)),
        from_text=_int_text(_positive),
    )
    backend_timeout: float = setting(
        300.0,
        "controller: seconds a backend call may run before its worker is replaced",
        "a number of seconds >= 1",
        _at_least_1s,
        from_text=_seconds_text(_at_least_1s),
        default_text="`300`",
    )
    grace_period: float = setting(
        30.0,
        "seconds to drain in-flight calls on SIGTERM",
        "a number of seconds >= 0",
        _seconds,
        from_text=_seconds_text(_seconds),
        default_text="`30`",
    )
    log_level: str = setting(
        "INFO",
        "`DEBUG` adds every request, secrets masked",
        "one of " + ", ".join(LOG_LEVELS),
        _choice(LOG_LEVELS, upper=True),
    )
    topology: Mapping[str, str] = setting(
        None,
        "this node's topology segments (`key=value,...` in env/flags)",
        "a mapping of topology keys to values (env/flag: key=value,key2=value2)",
        _labels,
        from_text=_labels_text,
        default_text="none",
        factory=lambda: MappingProxyType({}),
    )
    max_volumes_per_node: int = setting(
        0,
        "volumes one node may have published: the node announces it in NodeGetInfo, the controller refuses a "
        "ControllerPublishVolume beyond it (RESOURCE_EXHAUSTED); set the same value for both roles (0: no limit)",
        "an integer >= 0 (0: no limit)",
        lambda v: _not_negative(_int(v)),
        from_text=_int_text(_not_negative),
    )
    default_backend: str | None = setting(
        None,
        "backend used when a StorageClass names none",
        "the name of a configured backend",
        _str,
        default_text="first backend",
    )
    connector_store: str = setting(
        "database",
        "where nodes publish their connector properties: `database` (role `all`) or `kubernetes` (the Node "
        "object's annotation)",
        "one of " + ", ".join(CONNECTOR_STORES),
        _choice(CONNECTOR_STORES),
    )
    kubeconfig: Path | None = setting(
        None,
        "kubeconfig file for the `kubernetes` connector store (development)",
        "an absolute file path",
        _abs_path,
        default_text="in-cluster service account",
    )
    sensitive_options_dir: Path | None = setting(
        None,
        "directory of files `<backend>.<option>`, each the value of a sensitive driver option (a mounted Secret)",
        "an absolute directory path",
        _abs_path,
        default_text="none",
    )
    metrics_endpoint: str | None = setting(
        None,
        "`host:port` serving Prometheus metrics at `/metrics`",
        "host:port, e.g. 0.0.0.0:9810 (any address: :9810)",
        _host_port,
        default_text="none (off)",
    )
    health_endpoint: str | None = setting(
        None,
        "`host:port` serving `/livez` (the driver answers its own socket: for liveness) and `/readyz` (Probe: "
        "for readiness) over HTTP",
        "host:port, e.g. 127.0.0.1:9808 (any address: :9808)",
        _host_port,
        default_text="none (off)",
    )
    alpha_capabilities: bool = setting(
        True,
        "advertise the CSI spec's alpha capabilities (GET_SNAPSHOT, GET_VOLUME, VOLUME_CONDITION, "
        "SINGLE_NODE_MULTI_WRITER); `false` for sidecars that stop on them: those on csi-lib-utils v0.20.x "
        "(csi-provisioner v5.2.0), csi-sanity v5.4.0. The alpha calls still answer",
        "true or false",
        _bool,
        from_text=_bool_text,
    )
    audit_interval: float = setting(
        600.0,
        "controller: seconds between audits of storage, database and connector store (metrics "
        "`mbs_csi_audit_findings`); 0: never",
        "a number of seconds >= 0",
        _seconds,
        from_text=_seconds_text(_seconds),
        default_text="`600`",
    )
    backends: tuple[Backend, ...] = ()

    @property
    def database_display(self) -> str:
        return secrets.redact_url(self.database)

    @property
    def runs_controller(self) -> bool:
        return self.role in ("controller", "all")

    @property
    def runs_node(self) -> bool:
        return self.role in ("node", "all")

    @property
    def has_topology(self) -> bool:
        return bool(self.topology) or any(b.topology for b in self.backends)

    def backend(self, name: str | None) -> Backend | None:
        """The backend called ``name``, or the default one when ``name`` is None."""
        wanted = name if name is not None else self.default_backend
        return next((b for b in self.backends if b.name == wanted), None)

    def describe(self) -> dict[str, Any]:
        """A loggable view of every setting, with sensitive values masked."""
        shown: dict[str, Any] = {key: _shown(getattr(self, key), option) for key, option in OPTIONS.items()}
        shown["backends"] = [b.describe() for b in self.backends]
        return shown


def _shown(value: Any, option: Option) -> Any:
    if option.sensitive:
        return secrets.redact_url(value)
    if isinstance(value, Path | Endpoint):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _env_name(key: str, option: Option) -> str:
    return option.env or "MBS_CSI_" + key.upper()


# key -> Option, in declaration order: what the file, the environment and the flags accept.
OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(Settings) if "option" in f.metadata}
FILE_KEYS = (*OPTIONS, "backends")
BACKEND_KEYS = (
    "name",
    "volume_driver",
    "driver_options",
    "driver_sensitive_options",
    "topology",
    "mutable_parameters",
    "max_volumes_per_node",
)
CONFIG_ENV = "MBS_CSI_CONFIG"


def flag_help(key: str) -> str:
    """The ``serve`` flag's help: the README's meaning and default, in plain text."""
    option = OPTIONS[key]
    return f"{option.help} (default: {option.default_text}; env {_env_name(key, option)})".replace("`", "")


def reference_table() -> str:
    """The README's table of configuration keys, made from the declarations above."""
    lines = ["| key | env | flag | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for key, option in OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        lines.append(f"| `{key}` | `{_env_name(key, option)}` | `{flag}` | {option.default_text} | {option.help} |")
    lines.append("| `backends` | — | — | the loopback backend | list of backends, below |")
    return "\n".join(lines)


def _describe(value: Any, sensitive: bool = False) -> str:
    """How to show a rejected value in an error: its type only when it may be a secret."""
    kind = type(value).__name__
    if sensitive:
        return f"a value of type {kind}"
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({kind})"


def _convert(key: str, raw: Any, source: str, from_text: bool) -> Any:
    option = OPTIONS[key]
    try:
        return option.from_text(raw) if from_text else option.from_file(raw)
    except (TypeError, ValueError):
        raise ConfigError(source, key, f"expected {option.expected}, got {_describe(raw, option.sensitive)}") from None


# --- the config file -------------------------------------------------------------------------------


def read_file(path: str) -> dict[str, Any]:
    """Parse a YAML or JSON config file into a mapping (no validation of keys yet)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            path, "", f"cannot read the config file: {exc.__class__.__name__}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(path, "", f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(path, "", f"not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"expected a mapping of settings at the top, got {type(data).__name__}")
    return data


def _mapping(value: Any, source: str, key: str, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(source, key, f"expected {what}, got {_describe(value, sensitive=True)}")
    return dict(value)


def _plain_option(value: Any) -> bool:
    scalar = (str, int, float, bool)
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def parse_backend(raw: Any, source: str, key: str) -> Backend:
    """Validate one entry of ``backends``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            source, key, f"expected a mapping with keys {', '.join(BACKEND_KEYS)}, got {_describe(raw, sensitive=True)}"
        )
    for name in raw:
        if name not in BACKEND_KEYS:
            raise ConfigError(source, f"{key}.{name}", f"unknown key; expected one of {', '.join(BACKEND_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _BACKEND_NAME_RE.match(name):
        raise ConfigError(
            source,
            f"{key}.name",
            "missing or invalid; expected a name of letters, digits, "
            "'-', '_' or '.' (at most 63 characters), e.g. ceph-ssd",
        )
    driver = raw.get("volume_driver")
    if driver is None:
        raise ConfigError(
            source,
            f"{key}.volume_driver",
            "missing; expected the Python path of a Cinder "
            "volume driver class, e.g. "
            "cinder.volume.drivers.rbd.RBDDriver",
        )
    if not isinstance(driver, str) or not _CLASS_PATH_RE.match(driver):
        raise ConfigError(
            source,
            f"{key}.volume_driver",
            f"expected the Python path of a Cinder volume driver class, got {_describe(driver)}",
        )
    plain = _mapping(raw.get("driver_options"), source, f"{key}.driver_options", "a mapping of option names to values")
    for opt, value in plain.items():
        if not _plain_option(value):
            raise ConfigError(
                source,
                f"{key}.driver_options.{opt}",
                f"expected a string, number, boolean or list of them, got {_describe(value)}",
            )
    sensitive_raw = _mapping(
        raw.get("driver_sensitive_options"),
        source,
        f"{key}.driver_sensitive_options",
        "a mapping of option names to secret values",
    )
    sensitive: dict[str, secrets.Secret] = {}
    for opt, value in sensitive_raw.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(
                source,
                f"{key}.driver_sensitive_options.{opt}",
                f"expected a string, got {_describe(value, sensitive=True)}",
            )
        sensitive[opt] = secrets.Secret(str(value))
        if opt in plain:
            raise ConfigError(
                source,
                f"{key}.driver_sensitive_options.{opt}",
                "also set in driver_options; set a sensitive option in one place only",
            )
    try:
        topology = _labels(raw.get("topology") or {})
    except TypeError:
        raise ConfigError(
            source,
            f"{key}.topology",
            f"expected a mapping of topology keys to string values, got {_describe(raw.get('topology'))}",
        ) from None
    limit = raw.get("max_volumes_per_node", 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigError(
            source, f"{key}.max_volumes_per_node", f"expected an integer >= 0 (0: no limit), got {_describe(limit)}"
        )
    mutable = raw.get("mutable_parameters")
    if mutable is None:
        mutable = mutable_parameters.default_for(driver)
    elif not isinstance(mutable, list) or not all(isinstance(k, str) and k for k in mutable):
        raise ConfigError(
            source,
            f"{key}.mutable_parameters",
            f"expected a list of parameter names, e.g. [total_iops_sec], got {_describe(mutable)}",
        )
    return Backend(
        name=name,
        volume_driver=driver,
        driver_options=MappingProxyType(plain),
        driver_sensitive_options=MappingProxyType(sensitive),
        topology=MappingProxyType(topology),
        mutable_parameters=tuple(mutable),
        max_volumes_per_node=limit,
    )


def loopback_backend(state_dir: Path) -> Backend:
    """The embedded default backend: sparse files under the state dir (single host only)."""
    return Backend(
        name=LOOPBACK_BACKEND_NAME,
        volume_driver=LOOPBACK_DRIVER,
        driver_options=MappingProxyType({"loopback_dir": str(state_dir / "loopback")}),
        mutable_parameters=mutable_parameters.default_for(LOOPBACK_DRIVER),
    )


# --- putting it together ----------------------------------------------------------------------------


def load_settings(
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
) -> Settings:
    """Build :class:`Settings` from defaults < file < environment < flags.

    ``config_path`` falls back to ``$MBS_CSI_CONFIG``. ``flags`` maps option keys to the strings given
    on the command line (None for a flag not given).
    """
    env = env or {}
    flags = flags or {}
    config_path = config_path or env.get(CONFIG_ENV) or None
    values: dict[str, Any] = {}
    raw_backends: Any = None

    if config_path:
        data = read_file(config_path)
        for key, raw in data.items():
            if key == "backends":
                raw_backends = raw
            elif key in OPTIONS:
                values[key] = _convert(key, raw, config_path, from_text=False)
            else:
                raise ConfigError(config_path, str(key), f"unknown key; expected one of {', '.join(FILE_KEYS)}")

    for key, option in OPTIONS.items():
        name = _env_name(key, option)
        if env.get(name):
            values[key] = _convert(key, env[name], f"environment {name}", from_text=True)
    for key, text in flags.items():
        if text is not None:
            flag = "--" + key.replace("_", "-")
            values[key] = _convert(key, text, f"flag {flag}", from_text=True)

    state_dir = values.get("state_dir", Path(DEFAULT_STATE_DIR))
    values.setdefault("database", f"sqlite:///{state_dir}/mbs-csi.sqlite")
    password = secrets.url_password(values["database"])
    if password:
        secrets.register(password)

    source = config_path or "defaults"
    backends = _parse_backends(raw_backends, source) if raw_backends is not None else (loopback_backend(state_dir),)
    if "sensitive_options_dir" in values:
        backends = _add_sensitive_files(backends, values["sensitive_options_dir"])
    default = values.get("default_backend")
    if default is None and len(backends) >= 1:
        values["default_backend"] = backends[0].name
    elif default is not None and default not in {b.name for b in backends}:
        raise ConfigError(
            source,
            "default_backend",
            f"no backend called {default!r}; configured: {', '.join(b.name for b in backends) or 'none'}",
        )
    values["topology"] = MappingProxyType(values.get("topology", {}))
    return Settings(backends=backends, **values)


def _parse_backends(raw: Any, source: str) -> tuple[Backend, ...]:
    if not isinstance(raw, list):
        raise ConfigError(source, "backends", f"expected a list of backends, got {_describe(raw, sensitive=True)}")
    backends = tuple(parse_backend(item, source, f"backends[{i}]") for i, item in enumerate(raw))
    seen: set[str] = set()
    for i, backend in enumerate(backends):
        if backend.name in seen:
            raise ConfigError(source, f"backends[{i}].name", f"duplicate backend name {backend.name!r}")
        seen.add(backend.name)
    return backends


def _add_sensitive_files(backends: tuple[Backend, ...], directory: Path) -> tuple[Backend, ...]:
    """Add ``<backend>.<option>`` files of ``directory`` to the backends' sensitive options.

    This is how a Kubernetes Secret mounted as a volume reaches the driver; the files Kubernetes adds
    there itself (``..data`` and the like) start with a dot and are skipped.
    """
    source = f"sensitive_options_dir {directory}"
    try:
        names = sorted(p.name for p in directory.iterdir() if not p.name.startswith(".") and p.is_file())
    except OSError as exc:
        raise ConfigError(source, "", f"cannot list the directory: {exc.strerror or exc}") from None
    by_name = {b.name: b for b in backends}
    added: dict[str, dict[str, secrets.Secret]] = {}
    for file_name in names:
        backend_name, _, option = file_name.rpartition(".")
        backend = by_name.get(backend_name)
        if backend is None or not option:
            raise ConfigError(
                source,
                file_name,
                f"expected a file named <backend>.<option> for a configured backend "
                f"({', '.join(by_name) or 'none'}), e.g. {next(iter(by_name), 'array')}.san_password",
            )
        if option in backend.driver_options:
            raise ConfigError(
                source, file_name, f"option {option} is also set in driver_options; set a sensitive option in one place"
            )
        try:
            value = (directory / file_name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(source, file_name, f"cannot read the file: {exc.__class__.__name__}") from None
        value = value.removesuffix("\n")
        if not value:
            raise ConfigError(source, file_name, "the file is empty; expected the option's secret value")
        added.setdefault(backend_name, {})[option] = secrets.Secret(value)
    return tuple(
        replace(b, driver_sensitive_options=MappingProxyType({**b.driver_sensitive_options, **added[b.name]}))
        if b.name in added
        else b
        for b in backends
    )
