"""Imports point one way: read every module of the package and check the direction of its imports.

Static, from the source: imports inside functions and under ``if TYPE_CHECKING`` count, because a cycle
hidden there is still a cycle in the design. A second test checks at run time what the lightest entry
points load.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mbs_csi"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names, at any depth of its code."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            # `from mbs_csi import errors` imports the module mbs_csi.errors
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {i for i in _imports(path) if i in MODULES and i != name} for name, path in MODULES.items()}
ALL_IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_package_has_no_import_cycle():
    # Package __init__ modules are excluded as targets: `from mbs_csi import x` names mbs_csi itself.
    graph = {
        m: {i for i in deps if i not in ("mbs_csi", "mbs_csi.node", "mbs_csi.controller")} for m, deps in GRAPH.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


# (modules, what they must never import): the direction of the layers.
RULES = [
    # The bottom: plain Python that every process (node, front, workers) may load.
    (("mbs_csi.errors", "mbs_csi.secrets", "mbs_csi.filesystems"), ("grpc", "csi", "mbs_csi.config", "yaml")),
    # What both roles share knows neither role.
    (
        (
            "mbs_csi.config",
            "mbs_csi.logs",
            "mbs_csi.health",
            "mbs_csi.identity",
            "mbs_csi.interceptor",
            "mbs_csi.inflight",
            "mbs_csi.capabilities",
            "mbs_csi.publish_context",
            "mbs_csi.metrics",
            "mbs_csi.node_annotations",
        ),
        ("mbs_csi.controller", "mbs_csi.node", "mbs_csi.drivers", "mbs_csi.server", "mbs_csi.cli"),
    ),
    # The node runs on every host: never the controller's code, cinder, or the server.
    (("mbs_csi.node",), ("mbs_csi.controller", "mbs_csi.drivers", "mbs_csi.server", "cinder", "cinderlib", "eventlet")),
    # The controller never reaches into the node or the server that wires it.
    (("mbs_csi.controller", "mbs_csi.drivers"), ("mbs_csi.node", "mbs_csi.server", "mbs_csi.cli")),
    # The CLI's tools do not start the gRPC server.
    (("mbs_csi.backend_check",), ("mbs_csi.server", "grpc", "mbs_csi.interceptor")),
    # Nothing in the package reaches into the tests, the benchmarks or their helpers.
    (("mbs_csi",), ("tests", "bench", "testkit")),
]


@pytest.mark.parametrize(("owners", "forbidden"), RULES, ids=[r[0][0] for r in RULES])
def test_imports_point_one_way(owners, forbidden):
    wrong = sorted(
        f"{module} imports {imported}"
        for module, imported_names in ALL_IMPORTS.items()
        if any(_within(module, owner) for owner in owners)
        for imported in imported_names
        if any(_within(imported, f) for f in forbidden)
    )
    assert not wrong, wrong


def test_only_the_cli_starts_the_server():
    importers = sorted(m for m, deps in GRAPH.items() if "mbs_csi.server" in deps)
    assert importers == ["mbs_csi.cli"]


@pytest.mark.parametrize(
    ("code", "absent"),
    [
        # The node role's server: no controller front, no cinder.
        (
            "import tempfile; from mbs_csi import config, server\n"
            "with tempfile.TemporaryDirectory() as state:\n"
            "    server.Server(config.load_settings(flags={'role': 'node', 'state_dir': state}))",
            ("mbs_csi.controller", "cinder", "cinderlib", "kubernetes"),
        ),
        # `backend check` and `node attachments` load no gRPC server.
        ("import mbs_csi.backend_check", ("grpc", "mbs_csi.server")),
        ("import mbs_csi.node.attachments", ("grpc", "mbs_csi.server", "mbs_csi.node.service")),
        # The error hierarchy is plain Python.
        ("import mbs_csi.errors", ("grpc",)),
    ],
)
def test_entry_points_load_only_what_they_need(code, absent):
    check = f"import sys; {code}; print(' '.join(m for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert not [m for m in loaded for a in absent if _within(m, a)]


def test_the_readme_layout_names_every_module():
    """The README's layout table names each module once it exists, and none that is gone."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    # A row names modules of one package after its first entry, as `controller/a.py`, `b.py`.
    expected: set[str] = set()
    for path in MODULES.values():
        relative = path.relative_to(PACKAGE)
        if relative.name != "__init__.py":
            expected.add(relative.name if len(relative.parts) == 1 else str(relative))
    shown: set[str] = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        package = ""
        for cell in row.split("|")[1].split(","):
            name = cell.strip().strip("`")
            if "/" in name:
                package = name.rsplit("/", 1)[0] + "/"
                shown.add(name)
            else:
                shown.add(package + name)
    assert shown == expected, (sorted(expected - shown), sorted(shown - expected))
