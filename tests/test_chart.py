"""The Helm chart (charts/mbs-csi), rendered the way helm renders it and checked object by object.

No helm binary and no cluster exist here, so tests/helm_render, a small Go program, renders the chart with
Go's text/template and the sprig functions (the engine helm is built on) plus helm's own functions, with
helm's value merging; it is built once per session. Renders run in strict mode (a reference to a value
that does not exist is an error) unless a test says otherwise.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from mbs_csi import mutable_parameters
from mbs_csi.config import LOOPBACK_DRIVER, Settings, load_settings
from testkit.host import REPO

CHART = REPO / "charts" / "mbs-csi"
RENDERER_SOURCE = Path(__file__).resolve().parent / "helm_render"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
NAMESPACE = "storage"
RELEASE = "mbs-csi"
PG_SET = ("database.type=postgresql", "database.postgresql.existingSecret=pg-url")

SNAPSHOT_API = "snapshot.storage.k8s.io/v1"

# The sidecar releases the chart runs, per band of Kubernetes minors, and where each figure came from.
# 1.34 on: the current releases. Below 1.34 each sidecar's newest release whose minimum Kubernetes version
# (its release notes' "Minimum Kubernetes version", the same figure as the kubernetes-csi docs'
# compatibility tables) is at most 1.30:
#   csi-provisioner  v6.x needs 1.34 (v6.0.0, v6.0.2, v6.2.1 release notes: "minimum Kubernetes version
#                    is 1.34 for the storage/v1 VolumeAttributesClass API"), so v5.3.0, the last v5 (v5.x:
#                    minimum 1.20 per the v5.2.0 release notes; v5.3.0's own page was not found).
#   csi-attacher     v4.12.0: v4.x minimum 1.17 (docs table for v4.0-v4.8, v4.13.0 release notes).
#   csi-snapshotter  v8.6.0: v8.x minimum 1.25 (docs table for v8.0-v8.2, v8.5.0 release notes).
#   csi-resizer      v2.2.1: minimum 1.16 (v2.2.1 and v2.0.0 release notes; CHANGELOG-2.0: its
#                    VolumeAttributesClass gate turns itself off where the storage/v1 API is missing).
#   csi-node-driver-registrar v2.17.0: v2.x minimum 1.13 (docs table).
CURRENT = {
    "csi-provisioner": "registry.k8s.io/sig-storage/csi-provisioner:v6.3.0",
    "csi-attacher": "registry.k8s.io/sig-storage/csi-attacher:v4.12.0",
    "csi-snapshotter": "registry.k8s.io/sig-storage/csi-snapshotter:v8.6.0",
    "csi-resizer": "registry.k8s.io/sig-storage/csi-resizer:v2.2.1",
    "node-driver-registrar": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.17.0",
}
SIDECAR_IMAGES = {
    "1.34": CURRENT,
    "1.30": CURRENT | {"csi-provisioner": "registry.k8s.io/sig-storage/csi-provisioner:v5.3.0"},
}
LEADER_ELECTED = ("csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer")

# (api group, resource): verbs.
Rules = dict[tuple[str, str], set[str]]

# What each sidecar release's deploy/kubernetes RBAC file grants (the ClusterRole; the leader-election
# Role is LEASES). No pinned release's own file is stored in the reference index this was written from;
# each entry is an exact-version copy of the file (kubernetes/kubernetes keeps them, downloaded by tag, in
# test/e2e/testing-manifests/storage-csi/) plus every RBAC entry of the releases' CHANGELOGs since:
#   csi-provisioner v5.3.0: v6.0.0's file (commit fde22c3f of kubernetes/kubernetes); no RBAC entry in
#     CHANGELOG-5.0 after #1155 (patch persistentvolumes), 5.1, 5.2, 5.3 or 6.0.0.
#   csi-provisioner v6.3.0: the same plus watch and update on volumesnapshots ("Add rbac rules to
#     watch/update volumesnapshots", #1458, in 6.0.1, 6.1.1 and 6.2.0: the restore-source finalizer).
#   csi-attacher v4.12.0: v3.3.0's file (commit 01aa0f3f); no RBAC entry in CHANGELOG-3.4 to 4.11 (4.12's
#     is not stored).
#   csi-snapshotter v8.6.0: v8.4.0's file (commit 5e377f94); no RBAC entry in CHANGELOG-8.5 or 8.6. It has
#     no create on volumesnapshotcontents: since v8.2.0 (#1171) the snapshot-controller, not the sidecar,
#     makes the contents of a group snapshot's members.
#   csi-resizer v2.2.1: v1.11.1's file (commit 1892e4de), whose volumeattributesclasses rule v2.0.0 made
#     the default (#537); no other RBAC entry up to 2.2.0 (2.2.1's notes are not stored).
EVENTS = {("", "events"): {"list", "watch", "create", "update", "patch"}}
PROVISIONER_COMMON: Rules = {
    ("", "persistentvolumes"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
    ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
    **EVENTS,
    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list"},
    ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch"},
}
RELEASE_RULES: dict[str, Rules] = {
    "csi-provisioner:v5.3.0": PROVISIONER_COMMON | {("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list"}},
    "csi-provisioner:v6.3.0": PROVISIONER_COMMON
    | {
        ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list", "watch", "update"},
    },
    "csi-attacher:v4.12.0": {
        ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch", "patch"},
        ("storage.k8s.io", "volumeattachments/status"): {"patch"},
    },
    "csi-snapshotter:v8.6.0": {
        **EVENTS,
        ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list", "watch"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list", "watch", "update", "patch"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status"): {"update", "patch"},
        ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses"): {"get", "list", "watch"},
        ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents"): {"get", "list", "watch", "update", "patch"},
        ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status"): {"update", "patch"},
    },
    "csi-resizer:v2.2.1": {
        ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "persistentvolumeclaims/status"): {"patch"},
        **EVENTS,
        ("storage.k8s.io", "volumeattributesclasses"): {"get", "list", "watch"},
    },
}
# What the chart grants beyond a release's file, each for a call the release makes that its file forgets:
# csi-provisioner v6 reads the VolumeAttributesClass a claim names (one GET per CreateVolume, no informer:
# pkg/controller/controller.go) to pass its parameters as mutable_parameters; v5 does so only behind a
# feature gate the chart leaves off.
CHART_ADDITIONS: dict[str, Rules] = {
    "csi-provisioner:v6.3.0": {("storage.k8s.io", "volumeattributesclasses"): {"get"}},
}


def granted_rules(release: str) -> Rules:
    """What the chart's ClusterRole for a sidecar release must grant: its file's rules and our additions."""
    granted = {key: set(verbs) for key, verbs in RELEASE_RULES[release].items()}
    for key, verbs in CHART_ADDITIONS.get(release, {}).items():
        granted.setdefault(key, set()).update(verbs)
    return granted


# The driver in the controller pod reads the connector annotation of Nodes.
DRIVER_RULES: Rules = {("", "nodes"): {"get"}}
LEASES: Rules = {("coordination.k8s.io", "leases"): {"get", "watch", "list", "delete", "update", "create"}}
# The node plugin patches the connector annotation of its own Node: that and nothing else.
NODE_RULES: Rules = {("", "nodes"): {"get", "patch"}}


class DuplicateKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with a key twice (the API server would take one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key(s) {duplicates}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


class RenderError(Exception):
    pass


@dataclass
class Rendered:
    docs: list[dict[str, Any]]
    sources: set[str] = field(default_factory=set)
    kube_version: str = "1.34"
    snapshot_api: bool = False

    @property
    def kube_minor(self) -> str:
        return ".".join(self.kube_version.lstrip("v").split(".")[:2])

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def controller(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def node(self) -> dict[str, Any]:
        return self.one("DaemonSet")

    @property
    def test_pod(self) -> dict[str, Any]:
        return self.one("Pod")


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(obj)["containers"] if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


@pytest.fixture(scope="session")
def renderer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go") or "/usr/lib/go-1.19/bin/go"
    assert Path(go).exists(), "Go is missing: run `bash scripts/install.sh --dev`"
    binary = tmp_path_factory.mktemp("helm_render") / "helm_render"
    env = {
        **os.environ,
        # GOPATH mode on Debian's Go packages: no module download, nothing from the network.
        "GO111MODULE": "off",
        "GOPATH": "/usr/share/gocode",
        "GOFLAGS": "",
        "GOCACHE": os.environ.get("GOCACHE") or str(Path.home() / ".cache" / "go-build"),
    }
    proc = subprocess.run(
        [go, "build", "-o", str(binary), "."], cwd=RENDERER_SOURCE, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"building tests/helm_render failed:\n{proc.stderr}"
    return binary


@pytest.fixture
def render(renderer: Path, tmp_path: Path):
    """Render like `helm template`: Kubernetes ``kube_version`` (None: the renderer's default, as helm's),
    the built-in API versions plus ``api_versions``."""

    def run(
        *values: Path,
        sets: tuple[str, ...] = (),
        strict: bool = True,
        chart: Path = CHART,
        kube_version: str | None = None,
        api_versions: tuple[str, ...] = (),
        cluster: list[dict[str, Any]] | None = None,
    ) -> Rendered:
        cmd = [str(renderer), "-chart", str(chart), "-name", RELEASE, "-namespace", NAMESPACE]
        cmd += ["-strict"] if strict else []
        cmd += ["--kube-version", kube_version] if kube_version else []
        for api_version in api_versions:
            cmd += ["--api-versions", api_version]
        if cluster is not None:
            # What lookup finds, as at `helm install` against a cluster holding these objects.
            objects = tmp_path / "lookup-objects.yaml"
            objects.write_text(yaml.safe_dump(cluster))
            cmd += ["-lookup", str(objects)]
        for file in values:
            cmd += ["-f", str(file)]
        for item in sets:
            cmd += ["--set", item]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RenderError(proc.stderr)
        try:
            docs = [d for d in yaml.load_all(proc.stdout, Loader=DuplicateKeyLoader) if d is not None]
        except yaml.YAMLError as exc:
            raise RenderError(f"the output is not valid YAML: {exc}") from exc
        sources = set(re.findall(r"^# Source: (\S+)$", proc.stdout, flags=re.M))
        return Rendered(docs, sources, kube_version or "1.34", SNAPSHOT_API in api_versions)

    return run


# Every configuration the chart is rendered with: the defaults on the oldest and newest supported
# Kubernetes, with and without the VolumeSnapshot API, each example, and PostgreSQL with 2 replicas.
CASES = [
    *[
        pytest.param(((), (), kube, apis), id=f"defaults-{kube}-{'snapshots' if apis else 'no-snapshot-api'}")
        for kube in ("1.30.0", "1.34.0")
        for apis in ((), (SNAPSHOT_API,))
    ],
    *[
        pytest.param(((f,), (), kube, (SNAPSHOT_API,)), id=f"{f.stem}-{kube}")
        for f in EXAMPLES
        for kube in ("1.30.0", "1.34.0")
    ],
    pytest.param(((), (*PG_SET, "controller.replicas=2"), "1.34.0", (SNAPSHOT_API,)), id="postgresql-2-replicas"),
]


@pytest.fixture(params=CASES)
def rendered(request: pytest.FixtureRequest, render) -> Rendered:
    files, sets, kube_version, api_versions = request.param
    return render(*files, sets=sets, kube_version=kube_version, api_versions=api_versions)


def test_renderer_source_is_gofmt_clean():
    gofmt = shutil.which("gofmt") or "/usr/lib/go-1.19/bin/gofmt"
    proc = subprocess.run([gofmt, "-l", str(RENDERER_SOURCE)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_every_document_is_a_named_kubernetes_object(rendered: Rendered):
    seen = set()
    for doc in rendered.docs:
        assert isinstance(doc, dict), doc
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc
        assert isinstance(doc.get("kind"), str) and doc["kind"], doc
        name = doc.get("metadata", {}).get("name")
        assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name), doc
        if doc["kind"] not in {"CSIDriver", "StorageClass", "VolumeSnapshotClass", "ClusterRole", "ClusterRoleBinding"}:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]
        key = (doc["kind"], doc["metadata"].get("namespace"), name)
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
    kinds = {d["kind"] for d in rendered.docs}
    assert kinds >= {"CSIDriver", "ConfigMap", "Secret", "Deployment", "DaemonSet", "Pod", "Service"}
    assert kinds >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "PodDisruptionBudget"}


def ceph_values_with_node_stage_secret(tmp_path: Path, node_stage_secret: dict[str, Any]) -> Path:
    """A values file with one Ceph backend whose node-stage Secret the chart makes from ``node_stage_secret``."""
    path = tmp_path / "node-stage.yaml"
    backend = {
        "name": "ceph",
        "volume_driver": "cinder.volume.drivers.rbd.RBDDriver",
        "nodeStageSecret": node_stage_secret,
    }
    path.write_text(yaml.safe_dump({"backends": [backend]}))
    return path


def test_every_template_renders_in_some_configuration(render, tmp_path: Path):
    node_stage = ceph_values_with_node_stage_secret(tmp_path, {"data": {"keyring": "[client.cinder]\n\tkey = AQ==\n"}})
    sources: set[str] = set()
    for files, sets in [((), ()), *[((f,), ()) for f in EXAMPLES], ((node_stage,), ())]:
        sources |= render(*files, sets=sets, api_versions=(SNAPSHOT_API,)).sources
    sources |= render(sets=("database.type=postgresql", "database.postgresql.url=postgresql://u:p@db/mbs")).sources
    templates = {
        f"mbs-csi/templates/{p.name}"
        for p in (CHART / "templates").iterdir()
        if not p.name.startswith("_") and p.name != "NOTES.txt"
    }
    assert templates - sources == set()


def test_pod_specs_hold_together(rendered: Rendered):
    """What the API server would refuse, or what would break at run time: dangling names, bad ports."""
    for obj in [rendered.controller, rendered.node, rendered.test_pod]:
        spec = pod_spec(obj)
        volumes = [v["name"] for v in spec["volumes"]]
        assert len(volumes) == len(set(volumes)), volumes
        names = [c["name"] for c in spec["containers"]]
        assert len(names) == len(set(names)), names
        ports = [p["name"] for c in spec["containers"] for p in c.get("ports", [])]
        assert len(ports) == len(set(ports)) and all(len(p) <= 15 for p in ports), ports
        for c in spec["containers"]:
            assert c["image"] and c["resources"]["requests"], c["name"]
            assert {m["name"] for m in c.get("volumeMounts", [])} <= set(volumes), c["name"]
            mount_paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
            assert len(mount_paths) == len(set(mount_paths)), mount_paths
            env = [e["name"] for e in c.get("env", [])]
            assert len(env) == len(set(env)), env
            for probe in (c.get("livenessProbe"), c.get("readinessProbe")):
                if probe:
                    assert probe["httpGet"]["port"] in {p["name"] for p in c["ports"]}
            security = c.get("securityContext", {})
            if security.get("privileged"):
                assert security.get("allowPrivilegeEscalation") is not False, c["name"]
        if obj["kind"] != "Pod":
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = rendered.one("Service")
    controller_ports = {p["name"] for c in pod_spec(rendered.controller)["containers"] for p in c.get("ports", [])}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= controller_ports
    assert service["spec"]["selector"].items() <= rendered.controller["spec"]["template"]["metadata"]["labels"].items()
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == rendered.controller["spec"]["selector"]["matchLabels"]


def test_sidecars_run_exactly_the_pinned_releases(rendered: Rendered):
    images = {}
    for obj in [rendered.controller, rendered.node]:
        for c in pod_spec(obj)["containers"]:
            if c["name"] != "mbs-csi":
                assert images.setdefault(c["name"], c["image"]) == c["image"]
    expected = SIDECAR_IMAGES[rendered.kube_minor]
    if not rendered.snapshot_api:
        expected = {k: v for k, v in expected.items() if k != "csi-snapshotter"}
    assert images == expected
    for obj in [rendered.controller, rendered.node, rendered.test_pod]:
        driver = [c for c in pod_spec(obj)["containers"] if c["name"] in {"mbs-csi", "backend-check"}]
        assert [c["image"] for c in driver] == ["mbs-csi:0.1.0"]


@pytest.mark.parametrize(
    ("kube_version", "minor"),
    [("1.30.0", "1.30"), ("v1.31.4", "1.30"), ("1.33.9-gke.1200", "1.30"), ("1.34.0", "1.34"), ("1.36.2", "1.34")],
)
def test_sidecar_versions_follow_the_kubernetes_version(render, kube_version: str, minor: str):
    rendered = render(kube_version=kube_version, api_versions=(SNAPSHOT_API,))
    images = {
        c["name"]: c["image"] for obj in [rendered.controller, rendered.node] for c in pod_spec(obj)["containers"]
    }
    assert {k: v for k, v in images.items() if k != "mbs-csi"} == SIDECAR_IMAGES[minor]


def test_a_sidecar_image_set_in_values_replaces_the_releases(render):
    image = "registry.example.com/mirror/csi-provisioner:v6.2.1"
    for kube_version in ("1.30.0", "1.34.0"):
        rendered = render(sets=(f"sidecars.provisioner.image={image}",), kube_version=kube_version)
        assert container(rendered.controller, "csi-provisioner")["image"] == image
        # ...and the provisioner's RBAC follows the release it runs.
        assert role_rules(rendered, "provisioner") == granted_rules("csi-provisioner:v6.3.0")


@pytest.mark.parametrize("kube_version", ["1.29.9", "1.20.0"])
def test_kubernetes_below_1_30_is_refused_as_helm_refuses_it(render, kube_version: str):
    with pytest.raises(
        RenderError,
        match=rf"requires kubeVersion: >=1\.30\.0-0 which is incompatible with Kubernetes v{re.escape(kube_version)}",
    ):
        render(kube_version=kube_version)


def test_sidecars_share_the_driver_socket(rendered: Rendered):
    for obj, role in [(rendered.controller, "controller"), (rendered.node, "node")]:
        driver = container(obj, "mbs-csi")
        env = env_of(driver)
        assert env["CSI_ENDPOINT"]["value"] == "unix:///csi/csi.sock"
        assert env["MBS_CSI_ROLE"]["value"] == role
        for c in pod_spec(obj)["containers"]:
            assert {"name": "socket-dir", "mountPath": "/csi"} in c["volumeMounts"], c["name"]
            if c["name"] != "mbs-csi":
                assert "--csi-address=/csi/csi.sock" in c["args"], c["name"]
    volumes = {v["name"]: v for v in pod_spec(rendered.controller)["volumes"]}
    assert volumes["socket-dir"] == {"name": "socket-dir", "emptyDir": {}}


def rules_of(rules: list[dict[str, Any]]) -> Rules:
    """(api group, resource) -> verbs of a Role's rules, refusing wildcards."""
    granted: Rules = {}
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def role_rules(rendered: Rendered, suffix: str) -> Rules:
    return rules_of(rendered.one("ClusterRole", f"{RELEASE}-{suffix}")["rules"])


def effective_rules(rendered: Rendered, service_account: str) -> Rules:
    """Every (api group, resource) -> verbs the ServiceAccount gets through (Cluster)RoleBindings."""
    roles = {(d["kind"], d["metadata"]["name"]): d for d in rendered.all("ClusterRole") + rendered.all("Role")}
    granted: Rules = {}
    for binding in rendered.all("ClusterRoleBinding") + rendered.all("RoleBinding"):
        subject = {"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}
        if subject not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        role = roles[(ref["kind"], ref["name"])]
        assert role["kind"] == "ClusterRole" or role["metadata"]["namespace"] == NAMESPACE
        for key, verbs in rules_of(role["rules"]).items():
            granted.setdefault(key, set()).update(verbs)
    return granted


def test_each_sidecar_gets_exactly_the_rbac_of_its_release(rendered: Rendered):
    spec = pod_spec(rendered.controller)
    wanted: Rules = {}
    for c in spec["containers"]:
        if c["name"] == "mbs-csi":
            rules = DRIVER_RULES
            assert role_rules(rendered, "controller") == rules
        else:
            release = c["image"].rpartition("/")[2]
            rules = granted_rules(release)
            assert role_rules(rendered, c["name"].removeprefix("csi-")) == rules, release
            assert "--leader-election" in c["args"], c["name"]
        for key, verbs in rules.items():
            wanted.setdefault(key, set()).update(verbs)
    # Leader election at any replica count; its Role is namespaced.
    role = rendered.one("Role", f"{RELEASE}-leader-election")
    assert rules_of(role["rules"]) == LEASES
    wanted |= LEASES
    # The ServiceAccount gets the union and nothing else: no Secret in particular, and no snapshotter
    # rules when the snapshotter does not run.
    assert effective_rules(rendered, spec["serviceAccountName"]) == wanted
    assert ("csi-snapshotter" in {c["name"] for c in spec["containers"]}) == rendered.snapshot_api


def test_node_plugin_may_only_read_and_patch_nodes(rendered: Rendered):
    assert effective_rules(rendered, pod_spec(rendered.node)["serviceAccountName"]) == NODE_RULES


def test_test_pod_has_no_api_access(rendered: Rendered):
    assert rendered.test_pod["spec"]["automountServiceAccountToken"] is False


def test_sqlite_means_one_recreated_replica_with_its_state_on_a_claim(render):
    rendered = render()
    deployment = rendered.controller
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    # One replica still elects a leader: it holds the lease the next pod waits for.
    for name in ("csi-provisioner", "csi-attacher", "csi-resizer"):
        assert "--leader-election" in container(deployment, name)["args"], name
        assert f"--leader-election-namespace={NAMESPACE}" in container(deployment, name)["args"], name
    claim = rendered.one("PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    state = {v["name"]: v for v in pod_spec(deployment)["volumes"]}["state"]
    assert state["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert {"name": "state", "mountPath": "/var/lib/mbs-csi"} in container(deployment, "mbs-csi")["volumeMounts"]


@pytest.mark.parametrize("how", ["set", "file"])
def test_several_replicas_with_sqlite_are_refused(render, tmp_path: Path, how: str):
    files: tuple[Path, ...] = ()
    sets: tuple[str, ...] = ()
    if how == "set":
        sets = ("controller.replicas=2",)
    else:
        files = (tmp_path / "values.yaml",)
        files[0].write_text("controller:\n  replicas: 2\n")
    with pytest.raises(RenderError, match=r"controller\.replicas=2 needs database\.type=postgresql"):
        render(*files, sets=sets)


def test_several_replicas_with_postgresql_elect_leaders_and_keep_no_claim(render):
    rendered = render(sets=(*PG_SET, "controller.replicas=2"), api_versions=(SNAPSHOT_API,))
    deployment = rendered.controller
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    for name in LEADER_ELECTED:
        assert "--leader-election" in container(deployment, name)["args"], name
    assert rendered.all("PersistentVolumeClaim") == []
    database = env_of(container(deployment, "mbs-csi"))["MBS_CSI_DATABASE"]
    assert database["valueFrom"]["secretKeyRef"]["name"] == "pg-url"
    assert "database" not in yaml.safe_load(rendered.one("ConfigMap")["data"]["config.yaml"])


def test_node_plugin_gets_neither_the_backends_secrets_nor_the_database(rendered: Rendered):
    spec = pod_spec(rendered.node)
    assert not any("secret" in v or "projected" in v for v in spec["volumes"]), spec["volumes"]
    for c in spec["containers"]:
        env = env_of(c)
        assert "MBS_CSI_DATABASE" not in env and "MBS_CSI_SENSITIVE_OPTIONS_DIR" not in env, c["name"]
        assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in env.values()), c["name"]


@pytest.mark.parametrize("kubelet_dir", ["/var/lib/kubelet", "/data/kubelet"])
def test_node_plugin_mounts_what_attaching_and_mounting_need(render, kubelet_dir: str):
    rendered = render(sets=(f"node.kubeletDir={kubelet_dir}",))
    spec = pod_spec(rendered.node)
    assert spec["hostNetwork"] is True and "hostPID" not in spec
    assert {"operator": "Exists"} in spec["tolerations"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    driver = container(rendered.node, "mbs-csi")
    assert driver["securityContext"]["privileged"] is True
    host_paths = {
        m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
        for m in driver["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }
    socket_dir = f"{kubelet_dir}/plugins/mbs.csi.io"
    assert host_paths == {
        "/csi": socket_dir,
        kubelet_dir: kubelet_dir,
        "/dev": "/dev",
        "/sys": "/sys",
        "/run/udev": "/run/udev",
        "/lib/modules": "/lib/modules",
        "/etc/iscsi": "/etc/iscsi",
        "/var/lib/iscsi": "/var/lib/iscsi",
        "/etc/nvme": "/etc/nvme",
        "/var/lib/mbs-csi": "/var/lib/mbs-csi",
    }
    (kubelet,) = [m for m in driver["volumeMounts"] if m["mountPath"] == kubelet_dir]
    assert kubelet["mountPropagation"] == "Bidirectional"
    assert env_of(driver)["MBS_CSI_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    registrar = container(rendered.node, "node-driver-registrar")
    assert f"--kubelet-registration-path={socket_dir}/csi.sock" in registrar["args"]
    assert volumes["registration-dir"]["hostPath"]["path"] == f"{kubelet_dir}/plugins_registry"


def test_csidriver_object(render):
    assert render().one("CSIDriver", "mbs.csi.io")["spec"] == {
        "attachRequired": True,
        "podInfoOnMount": False,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent"],
    }


def test_a_storage_class_per_backend_and_a_snapshot_class(render):
    rendered = render(CHART / "examples" / "ceph-rbd.yaml", api_versions=(SNAPSHOT_API,))
    storage_class = rendered.one("StorageClass", "mbs-ceph")
    assert storage_class["provisioner"] == "mbs.csi.io" and storage_class["allowVolumeExpansion"] is True
    assert storage_class["parameters"] == {
        "backend": "ceph",
        "csi.storage.k8s.io/fstype": "ext4",
        "csi.storage.k8s.io/node-stage-secret-name": "ceph-node-stage",  # the user's own Secret
        "csi.storage.k8s.io/node-stage-secret-namespace": NAMESPACE,
    }
    snapshot_class = rendered.one("VolumeSnapshotClass")
    assert snapshot_class["driver"] == "mbs.csi.io" and snapshot_class["deletionPolicy"] == "Delete"
    defaults = render()
    configured = yaml.safe_load(defaults.one("ConfigMap")["data"]["config.yaml"])["backends"]
    assert [c["parameters"]["backend"] for c in defaults.all("StorageClass")] == [b["name"] for b in configured]


def test_ceph_example_mounts_the_ceph_client_secret_on_the_controller_only(render):
    rendered = render(CHART / "examples" / "ceph-rbd.yaml")
    for obj in [rendered.controller, rendered.test_pod]:
        c = pod_spec(obj)["containers"][0]
        assert {"name": "ceph-client", "mountPath": "/etc/ceph", "readOnly": True} in c["volumeMounts"]
        volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
        assert volumes["ceph-client"]["secret"]["secretName"] == "ceph-client"
    assert "ceph-client" not in {v["name"] for v in pod_spec(rendered.node)["volumes"]}


def test_node_stage_secret_from_values(render, tmp_path: Path):
    values = ceph_values_with_node_stage_secret(
        tmp_path, {"namespace": "ceph-secrets", "data": {"keyring": "[client.cinder]\n"}}
    )
    rendered = render(values)
    secret = rendered.one("Secret", f"{RELEASE}-ceph-node-stage")
    assert secret["metadata"]["namespace"] == "ceph-secrets"
    assert base64.b64decode(secret["data"]["keyring"]).decode() == "[client.cinder]\n"
    params = rendered.one("StorageClass")["parameters"]
    assert params["csi.storage.k8s.io/node-stage-secret-name"] == f"{RELEASE}-ceph-node-stage"
    assert params["csi.storage.k8s.io/node-stage-secret-namespace"] == "ceph-secrets"


def test_helm_test_pod_checks_the_backends_with_the_controller_configuration(rendered: Rendered):
    pod = rendered.test_pod
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (check,) = pod["spec"]["containers"]
    assert check["args"] == ["backend", "check"]
    driver = container(rendered.controller, "mbs-csi")
    driver_env = env_of(driver)
    for name in ["MBS_CSI_CONFIG", "MBS_CSI_SENSITIVE_OPTIONS_DIR", "MBS_CSI_DATABASE"]:
        assert env_of(check).get(name) == driver_env.get(name), name
    controller_volumes = {v["name"]: v for v in pod_spec(rendered.controller)["volumes"]}
    test_volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    shared = [m for m in driver["volumeMounts"] if m["name"] not in {"socket-dir", "state", "tmp"}]
    assert shared and all(m in check["volumeMounts"] for m in shared)
    assert all(test_volumes[m["name"]] == controller_volumes[m["name"]] for m in shared)
    assert check["securityContext"] == driver["securityContext"]
    assert pod["spec"]["securityContext"] == pod_spec(rendered.controller)["securityContext"]


def driver_settings(obj: dict[str, Any], rendered: Rendered, workdir: Path):
    """Settings the driver container of ``obj`` would start with, loaded by the driver's own loader."""
    c = pod_spec(obj)["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
    # Lay out the files of the ConfigMap and Secret volumes as kubelet would, under workdir.
    secrets = {s["metadata"]["name"]: s for s in rendered.all("Secret")}
    paths: dict[str, Path] = {}
    for name, mount_path in mounts.items():
        volume = volumes[name]
        if "configMap" in volume:
            data = rendered.one("ConfigMap", volume["configMap"]["name"])["data"]
        elif "secret" in volume and volume["secret"]["secretName"] in secrets:
            secret = secrets[volume["secret"]["secretName"]]
            data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        else:
            continue  # host paths, scratch space, Secrets the user creates (a ceph.conf)
        # kubelet's layout: the keys are links through "..data" to a timestamped directory.
        target = workdir / name
        (target / "..2025_01_01_00_00_00.1").mkdir(parents=True)
        (target / "..data").symlink_to("..2025_01_01_00_00_00.1")
        for key, value in data.items():
            (target / "..data" / key).write_text(value)
            (target / key).symlink_to(f"..data/{key}")
        paths[mount_path] = target
    env = {}
    for e in c["env"]:
        if "value" in e:
            value = e["value"]
            for mount_path, target in paths.items():
                value = value.replace(mount_path, str(target))
            env[e["name"]] = value
        elif "fieldRef" in e["valueFrom"]:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
            env[e["name"]] = "worker-1"
        else:
            assert e["name"] == "MBS_CSI_DATABASE" and "secretKeyRef" in e["valueFrom"]
            env[e["name"]] = "postgresql://mbs:chart-db-pa55@db.example.com/mbs"
    return load_settings(env=env), env


def test_driver_accepts_the_rendered_configuration(rendered: Rendered, tmp_path: Path):
    values_backends = yaml.safe_load(rendered.one("ConfigMap")["data"]["config.yaml"])["backends"]
    (tmp_path / "controller").mkdir()
    settings, env = driver_settings(rendered.controller, rendered, tmp_path / "controller")
    assert settings.role == "controller"
    assert str(settings.endpoint) == "unix:///csi/csi.sock"
    assert settings.driver_name == "mbs.csi.io"
    assert settings.connector_store == "kubernetes"
    assert settings.metrics_endpoint == "0.0.0.0:9810"
    assert str(settings.state_dir) == "/var/lib/mbs-csi"
    assert [b.name for b in settings.backends] == [b["name"] for b in values_backends]
    assert settings.database.startswith("postgresql://") == ("MBS_CSI_DATABASE" in env)
    secret = rendered.one("Secret", f"{RELEASE}-backend-options")
    for key, value in (secret.get("data") or {}).items():
        backend, _, option = key.rpartition(".")
        sensitive = settings.backend(backend).driver_sensitive_options[option]
        assert sensitive.reveal() == base64.b64decode(value).decode()

    (tmp_path / "node").mkdir()
    node, _ = driver_settings(rendered.node, rendered, tmp_path / "node")
    assert node.role == "node" and node.node_id == "worker-1"
    assert node.connector_store == "kubernetes" and node.driver_name == settings.driver_name
    assert node.sensitive_options_dir is None and node.database.startswith("sqlite:")
    assert all(not b.driver_sensitive_options for b in node.backends)

    (tmp_path / "test").mkdir()
    checked, _ = driver_settings(rendered.test_pod, rendered, tmp_path / "test")
    assert [b.all_options() for b in checked.backends] == [b.all_options() for b in settings.backends]
    assert checked.database == settings.database


def test_every_driver_key_of_a_backend_and_the_controller_reaches_the_driver(render, tmp_path: Path):
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "alphaCapabilities": False,
                "controller": {"auditInterval": 120},
                "node": {"maxVolumesPerNode": 16},
                "backends": [
                    {
                        "name": "loop",
                        "volume_driver": LOOPBACK_DRIVER,
                        "driver_options": {"loopback_dir": "/var/lib/mbs-csi/loop"},
                        "mutable_parameters": ["total_iops_sec", "read_bytes_sec"],
                        "max_volumes_per_node": 3,
                    },
                    {"name": "plain", "volume_driver": LOOPBACK_DRIVER},
                ],
            }
        )
    )
    rendered = render(values)
    (tmp_path / "controller").mkdir()
    settings, _ = driver_settings(rendered.controller, rendered, tmp_path / "controller")
    assert settings.alpha_capabilities is False
    assert settings.audit_interval == 120
    assert settings.max_volumes_per_node == 16
    loop, plain = settings.backends
    assert loop.mutable_parameters == ("total_iops_sec", "read_bytes_sec") and loop.max_volumes_per_node == 3
    # Keys a backend leaves out keep the driver's defaults (for loopback, the QoS limits).
    assert plain.max_volumes_per_node == 0
    assert plain.mutable_parameters == mutable_parameters.default_for(LOOPBACK_DRIVER) != ()
    # And the chart's defaults are the driver's.
    (tmp_path / "defaults").mkdir()
    plain_install = render()
    defaults, _ = driver_settings(plain_install.controller, plain_install, tmp_path / "defaults")
    assert (defaults.alpha_capabilities, defaults.audit_interval) == (True, Settings().audit_interval)


def test_iscsi_example_keeps_the_password_out_of_the_configmap(render):
    rendered = render(CHART / "examples" / "iscsi-xtremio.yaml")
    secret = rendered.one("Secret", f"{RELEASE}-backend-options")
    assert base64.b64decode(secret["data"]["xtremio.san_password"]).decode() == "change-me"
    config = yaml.safe_load(rendered.one("ConfigMap")["data"]["config.yaml"])
    assert config["backends"][0]["driver_options"] == {
        "san_ip": "192.0.2.10",
        "san_login": "admin",
        "xtremio_cluster_name": "xtremio-cluster-1",
    }
    assert "change-me" not in yaml.safe_dump([d for d in rendered.docs if d["kind"] != "Secret"])


def test_an_existing_options_secret_replaces_the_charts(render):
    rendered = render(sets=("sensitiveOptions.existingSecret=array-passwords",))
    assert rendered.all("Secret") == []
    for obj in [rendered.controller, rendered.test_pod]:
        volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
        assert volumes["backend-options"]["secret"]["secretName"] == "array-passwords"


def test_loopback_example_runs_the_controller_as_root_with_the_host_dev(render):
    rendered = render(CHART / "examples" / "loopback.yaml")
    spec = pod_spec(rendered.controller)
    assert spec["securityContext"]["runAsUser"] == 0 and "fsGroup" not in spec["securityContext"]
    driver = container(rendered.controller, "mbs-csi")
    assert driver["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    dev = next(m for m in driver["volumeMounts"] if m["mountPath"] == "/dev")
    assert volumes[dev["name"]]["hostPath"]["path"] == "/dev"
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/mbs-csi-controller"


def test_controller_runs_as_non_root_by_default(render):
    rendered = render()
    security = pod_spec(rendered.controller)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001 and security["fsGroup"] == 10001
    for c in pod_spec(rendered.controller)["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_metrics_service_and_health_probes(render):
    rendered = render(api_versions=(SNAPSHOT_API,))
    ports = {p["name"]: p["port"] for p in rendered.one("Service")["spec"]["ports"]}
    assert ports == {
        "metrics": 9810,
        "prov-metrics": 9811,
        "attach-metrics": 9812,
        "snap-metrics": 9813,
        "resize-metrics": 9814,
    }
    for name, port in [("csi-provisioner", 9811), ("csi-attacher", 9812), ("csi-resizer", 9814)]:
        assert f"--http-endpoint=:{port}" in container(rendered.controller, name)["args"]
    # The driver serves its own /livez and /readyz: liveness is "it answers", readiness is Probe.
    for obj, address, host in [(rendered.controller, "0.0.0.0:9808", {}), (rendered.node, "127.0.0.1:9858", None)]:
        driver = container(obj, "mbs-csi")
        assert {"name": "MBS_CSI_HEALTH_ENDPOINT", "value": address} in driver["env"]
        port = int(address.rpartition(":")[2])
        assert {"name": "healthz", "containerPort": port} in driver["ports"]
        expected = {"path": "/livez", "port": "healthz"} | ({"host": "127.0.0.1"} if host is None else {})
        assert driver["livenessProbe"]["httpGet"] == expected
        assert load_settings(env={"MBS_CSI_HEALTH_ENDPOINT": address}).health_endpoint == address  # a valid value
    controller = container(rendered.controller, "mbs-csi")
    assert controller["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "healthz"}


def test_group_snapshots_turn_on_the_snapshotters_feature_gate(render):
    gate = "--feature-gates=CSIVolumeGroupSnapshot=true"
    default = render(api_versions=(SNAPSHOT_API,))
    assert gate not in container(default.controller, "csi-snapshotter")["args"]  # off by default
    rendered = render(sets=("snapshots.groupSnapshots=true",), api_versions=(SNAPSHOT_API,))
    assert gate in container(rendered.controller, "csi-snapshotter")["args"]
    granted = effective_rules(rendered, pod_spec(rendered.controller)["serviceAccountName"])
    assert granted[("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents")] >= {"get", "update", "patch"}
    assert granted[("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses")] >= {"get", "list", "watch"}
    # The members' VolumeSnapshotContents are made by the snapshot-controller (v8.2.0 on), not the sidecar.
    assert "create" not in granted[("snapshot.storage.k8s.io", "volumesnapshotcontents")]


def test_snapshots_can_be_turned_off(render):
    rendered = render(sets=("snapshots.enabled=false",), api_versions=(SNAPSHOT_API,))
    assert "csi-snapshotter" not in {c["name"] for c in pod_spec(rendered.controller)["containers"]}
    assert rendered.all("VolumeSnapshotClass") == []
    assert not any(r["metadata"]["name"].endswith("-snapshotter") for r in rendered.all("ClusterRole"))


# --- the check itself: it fails when it should, and behaves as helm does -----------------------------


def test_a_missing_required_value_fails_the_render(render, tmp_path: Path):
    values = tmp_path / "values.yaml"
    values.write_text("backends:\n  - volume_driver: cinder.volume.drivers.rbd.RBDDriver\n")
    with pytest.raises(RenderError, match="every entry of backends needs a name"):
        render(values, strict=False)


def test_strict_mode_catches_a_misspelt_value(render, tmp_path: Path):
    chart = tmp_path / "mbs-csi"
    shutil.copytree(CHART, chart)
    template = chart / "templates" / "controller-deployment.yaml"
    template.write_text(template.read_text().replace(".Values.controller.healthPort", ".Values.controller.healtPort"))
    # helm (not strict) renders the typo silently: the driver's health port comes out empty...
    lenient = render(chart=chart, strict=False)
    assert {"name": "healthz", "containerPort": None} in container(lenient.controller, "mbs-csi")["ports"]
    # ...which the tests' strict mode refuses.
    with pytest.raises(RenderError, match="healtPort"):
        render(chart=chart)


@pytest.fixture
def tiny_chart(tmp_path: Path) -> Iterator[Path]:
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 1.2.3\nappVersion: '4.5'\n")
    (chart / "values.yaml").write_text("a: {b: 1, c: keep, d: drop}\nnum: 2\nlist: [p, q]\n")
    (chart / "templates" / "_helpers.tpl").write_text('{{- define "tiny.name" -}}{{ .Chart.Name }}-x{{- end }}')
    (chart / "templates" / "cm.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ include "tiny.name" . }}\n'
        "  namespace: {{ .Release.Namespace }}\ndata:\n"
        "  a: {{ toYaml .Values.a | quote }}\n"
        "  num: {{ kindOf .Values.num | quote }}\n"
        "  list: {{ toYaml .Values.list | quote }}\n"
        '  chart: {{ printf "%s %s %s" .Chart.Version .Chart.AppVersion .Release.Service | quote }}\n'
        "  template: {{ .Template.Name | quote }}\n"
    )
    (chart / "templates" / "NOTES.txt").write_text("notes are rendered, not printed\n")
    yield chart


def test_renderer_merges_values_like_helm(render, tiny_chart: Path, tmp_path: Path):
    values = tmp_path / "v.yaml"
    values.write_text("a: {c: changed, d: null}\nlist: [z]\n")
    data = render(values, sets=("num=3", "a.e=true"), chart=tiny_chart).one("ConfigMap", "tiny-x")["data"]
    assert yaml.safe_load(data["a"]) == {"b": 1, "c": "changed", "e": True}
    assert data["num"] == "int64"  # --set types integers; values files give float64, as in helm
    assert yaml.safe_load(data["list"]) == ["z"]
    assert data["chart"] == "1.2.3 4.5 Helm"
    assert data["template"] == "tiny/templates/cm.yaml"
    assert render(chart=tiny_chart).one("ConfigMap")["data"]["num"] == "float64"


def test_values_are_documented_key_by_key():
    lines = (CHART / "values.yaml").read_text().splitlines()
    previous = ""
    for number, line in enumerate(lines, 1):
        if re.match(r"^\s*[A-Za-z0-9_.-]+:", line):
            assert previous.lstrip().startswith("#"), f"values.yaml:{number}: no comment above {line.strip()}"
        if line.strip():
            previous = line


# --- Kubernetes versions, the cluster's APIs, and what the chart refuses -----------------------------


def test_renderer_capabilities_and_lookup_like_helm(render, tmp_path: Path):
    chart = tmp_path / "caps"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: caps\nversion: 1.0.0\nkubeVersion: '>=1.25.0-0'\n")
    (chart / "values.yaml").write_text("{}\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: caps\ndata:\n"
        "  version: {{ .Capabilities.KubeVersion.Version | quote }}\n"
        "  minor: {{ .Capabilities.KubeVersion.Minor | quote }}\n"
        '  printed: {{ printf "%s" .Capabilities.KubeVersion | quote }}\n'
        '  apps: {{ .Capabilities.APIVersions.Has "apps/v1" | quote }}\n'
        '  snapshots: {{ .Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1" | quote }}\n'
        '  recent: {{ semverCompare ">=1.34.0-0" .Capabilities.KubeVersion.Version | quote }}\n'
        '  found: {{ (lookup "v1" "Namespace" "" "kube-system").metadata | default dict | keys | join "," | quote }}\n'
        '  listed: {{ dig "items" list (lookup "v1" "Namespace" "" "") | len | quote }}\n'
    )
    # helm template's defaults: its own Kubernetes version, the built-in APIs only, lookup finds nothing.
    data = render(chart=chart, strict=False).one("ConfigMap")["data"]
    assert data == {
        "version": "v1.34.0",
        "minor": "34",
        "printed": "v1.34.0",
        "apps": "true",
        "snapshots": "false",
        "recent": "true",
        "found": "",
        "listed": "0",
    }
    namespaces = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in ("kube-system", "a")]
    data = render(
        chart=chart, strict=False, kube_version="1.30.2", api_versions=(SNAPSHOT_API,), cluster=namespaces
    ).one("ConfigMap")["data"]
    assert data["version"] == "v1.30.2" and data["minor"] == "30" and data["recent"] == "false"
    assert data["snapshots"] == "true"
    assert data["found"] == "name" and data["listed"] == "2"
    with pytest.raises(
        RenderError, match=r"chart requires kubeVersion: >=1\.25\.0-0 which is incompatible with Kubernetes v1\.24\.0"
    ):
        render(chart=chart, kube_version="1.24.0")


def test_without_the_snapshot_api_no_snapshot_object_is_made(render):
    rendered = render()  # as `helm template` or a cluster without the VolumeSnapshot CRDs
    assert not any(d["apiVersion"].startswith("snapshot.storage.k8s.io/") for d in rendered.docs)
    assert "csi-snapshotter" not in {c["name"] for c in pod_spec(rendered.controller)["containers"]}
    assert not any(d["metadata"]["name"].endswith("-snapshotter") for d in rendered.all("ClusterRole"))
    assert not any(d["metadata"]["name"].endswith("-snapshotter") for d in rendered.all("ClusterRoleBinding"))
    assert "snap-metrics" not in {p["name"] for p in rendered.one("Service")["spec"]["ports"]}
    for how in [{"api_versions": (SNAPSHOT_API,)}, {"sets": ("snapshots.force=true",)}]:
        forced = render(**how)
        assert forced.one("VolumeSnapshotClass")["driver"] == "mbs.csi.io", how
        assert "csi-snapshotter" in {c["name"] for c in pod_spec(forced.controller)["containers"]}, how
        assert role_rules(forced, "snapshotter") == granted_rules("csi-snapshotter:v8.6.0"), how
        assert "snap-metrics" in {p["name"] for p in forced.one("Service")["spec"]["ports"]}, how


@pytest.mark.parametrize("backend_timeout", [30, 300, 900])
def test_sidecars_wait_longer_than_a_backend_call_may_take(render, backend_timeout: int):
    rendered = render(sets=(f"controller.backendTimeout={backend_timeout}",), api_versions=(SNAPSHOT_API,))
    config = yaml.safe_load(rendered.one("ConfigMap")["data"]["config.yaml"])
    assert config["backend_timeout"] == backend_timeout
    for name in LEADER_ELECTED:
        (timeout,) = [
            a.partition("=")[2] for a in container(rendered.controller, name)["args"] if a.startswith("--timeout=")
        ]
        assert re.fullmatch(r"\d+s", timeout), timeout
        assert int(timeout[:-1]) == backend_timeout + 60, name


def test_registrar_runs_with_the_upstream_settings(render):
    registrar = container(render().node, "node-driver-registrar")
    assert registrar["image"].startswith("registry.k8s.io/sig-storage/csi-node-driver-registrar:")
    assert "--timeout=30s" in registrar["args"]
    assert "--http-endpoint=127.0.0.1:9859" in registrar["args"]
    assert registrar["ports"] == [{"name": "registrar", "containerPort": 9859}]
    probe = registrar["livenessProbe"]
    assert probe["httpGet"] == {"host": "127.0.0.1", "path": "/healthz", "port": "registrar"}
    assert probe["timeoutSeconds"] >= 5


def test_pods_are_confined_where_they_can_be(render):
    rendered = render(api_versions=(SNAPSHOT_API,))
    node = pod_spec(rendered.node)
    assert "hostPID" not in node  # nothing in the node plugin enters or signals host processes
    for obj in [rendered.controller, rendered.node]:
        for c in pod_spec(obj)["containers"]:
            if c["name"] == "mbs-csi":
                continue
            security = c["securityContext"]
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
            assert security["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert pod_spec(rendered.controller)["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert node["nodeSelector"] == {"kubernetes.io/os": "linux"}
    control_plane = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}
    assert pod_spec(rendered.controller)["tolerations"] == [control_plane]


def default_backend_values(tmp_path: Path) -> Path:
    """A backend whose StorageClass is the cluster default."""
    values = tmp_path / "default-class.yaml"
    values.write_text(
        yaml.safe_dump(
            {"backends": [{"name": "xtremio", "volume_driver": "x.Driver", "storageClass": {"isDefault": True}}]}
        )
    )
    return values


def test_the_controller_claim_on_its_own_default_class_is_refused(render, tmp_path: Path):
    values = default_backend_values(tmp_path)
    with pytest.raises(RenderError, match=r"backends\[xtremio\]\.storageClass\.isDefault .* cannot start without it"):
        render(values)
    # Any way of keeping the claim off this driver's class is accepted.
    for sets in [
        ("controller.state.persistentVolumeClaim.storageClassName=standard",),
        ("controller.state.persistentVolumeClaim.existingClaim=state",),
        ("controller.state.hostPath=/var/lib/mbs-csi-controller",),
        PG_SET,
    ]:
        render(values, sets=sets)
    claim = render(values, sets=("controller.state.persistentVolumeClaim.storageClassName=standard",))
    assert claim.one("PersistentVolumeClaim")["spec"]["storageClassName"] == "standard"


def test_the_cluster_default_class_of_this_driver_is_refused_at_install(render):
    def storage_class(name: str, provisioner: str, default: bool) -> dict[str, Any]:
        annotations = {"storageclass.kubernetes.io/is-default-class": "true"} if default else {}
        meta = {"name": name, "annotations": annotations}
        return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": meta, "provisioner": provisioner}

    ours = [storage_class("standard", "rancher.io/local-path", False), storage_class("fast", "mbs.csi.io", True)]
    with pytest.raises(RenderError, match=r"default StorageClass fast is served by this driver \(mbs\.csi\.io\)"):
        render(cluster=ours)
    render(
        cluster=[storage_class("standard", "rancher.io/local-path", True), storage_class("fast", "mbs.csi.io", False)]
    )
    render(cluster=ours, sets=("controller.state.persistentVolumeClaim.storageClassName=standard",))
    # An upgrade: the claim exists and keeps the class it was bound with.
    claim_meta = {"name": f"{RELEASE}-controller-state", "namespace": NAMESPACE}
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": claim_meta}
    render(cluster=[*ours, claim])


def test_storage_class_parameters_the_driver_refuses_are_refused(render, tmp_path: Path):
    values = tmp_path / "parameters.yaml"
    backend = {"name": "ceph", "volume_driver": "x.Driver", "storageClass": {"parameters": {"backend": "other"}}}
    values.write_text(yaml.safe_dump({"backends": [backend]}))
    with pytest.raises(RenderError, match=r"backends\[ceph\]\.storageClass\.parameters: the driver accepts no"):
        render(values)


def test_a_duplicate_key_cannot_render(render, tiny_chart: Path):
    # What a StorageClass parameter set twice used to render: the check refuses it.
    (tiny_chart / "templates" / "sc.yaml").write_text(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: x\nprovisioner: p\n"
        "parameters:\n  backend: a\n  backend: b\n"
    )
    with pytest.raises(RenderError, match=r"duplicate key\(s\) \['backend'\]"):
        render(chart=tiny_chart)
