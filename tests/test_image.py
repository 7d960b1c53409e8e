"""The image, built for real from the Dockerfile by scripts/build-image.sh (podman; here, with no image
registry reachable, on a debian:12-slim made with debootstrap) and run with ``podman run``: the command
answers, ``backend check`` initialises the loopback backend inside it, and the image holds what the
driver runs with and nothing of what building it took.

The built image and its builder stage stay in podman's storage: they are the next build's cache."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from testkit.driver import run_cli
from testkit.host import REPO

pytestmark = pytest.mark.slow

TAG = "localhost/mbs-csi:test"
# Measured 2026-12: see the README's Image section; the bound leaves room for Debian's point releases.
MAX_SIZE = 750 * 1024**2
HOST_TOOLS = ["rbd", "ceph", "iscsiadm", "multipath", "nvme", "sg_inq", "losetup", "blkid", "mkfs.ext4", "mkfs.xfs"]
HOST_TOOLS += ["mkfs.btrfs", "resize2fs", "xfs_growfs", "tini"]


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    built = subprocess.run(
        ["bash", "scripts/build-image.sh", "-t", TAG], cwd=REPO, capture_output=True, text=True, timeout=3600
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    yield TAG


def engine_options() -> list[str]:
    """What podman needs on this host (the build script works it out)."""
    done = subprocess.run(
        ["bash", "scripts/build-image.sh", "--engine-options"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def podman_run(
    image: str, *args: str, entrypoint: str | None = None, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``podman run`` as the image is run (its user, entry point), with no network."""
    options = ("--rm", "--network=none", *engine_options(), *options)
    if entrypoint:
        options += ("--entrypoint", entrypoint)
    return subprocess.run(["podman", "run", *options, image, *args], capture_output=True, text=True, timeout=300)


def shell(image: str, script: str, user: str | None = None) -> str:
    done = podman_run(image, "-c", f"set -eu; {script}", entrypoint="bash", options=("--user", user) if user else ())
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_version_answers_as_the_installed_command(image: str):
    done = podman_run(image, "version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == run_cli("version").stdout != ""


def test_backend_check_initialises_the_loopback_backend_inside(image: str):
    """The embedded default (SQLite and the loopback backend under /var/lib/mbs-csi), as the image's
    unprivileged user: cinderlib, the database and the driver all start (the driver wants the host's
    loop-control device, which the chart's privileged pod has; only that device is passed here)."""
    done = podman_run(image, "backend", "check", "--json", options=("--device", "/dev/loop-control"))
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = json.loads(done.stdout)
    assert report["name"] == "loopback" and report["ok"], report
    assert report["stats"]["total_capacity_gb"] > 0


def test_controller_runs_as_uid_10001(image: str):
    assert shell(image, "id -u; id -g").split() == ["10001", "10001"]


def test_every_backend_stack_imports_and_the_host_tools_are_there(image: str):
    """With the unused cinder clients gone, cinder's volume manager (which many drivers import) and drivers
    that need no client package of their own still import."""
    drivers = ["rbd", "lvm", "nfs", "dell_emc.xtremio", "netapp.dataontap.block_cmode", "pure"]
    shell(
        image,
        "python -W ignore -c 'import cinderlib, os_brick, rados, rbd, kubernetes, psycopg2; "
        "from cinder import objects; objects.register_all(); import cinder.volume.manager; "
        + "; ".join(f"import cinder.volume.drivers.{driver}" for driver in drivers)
        + "; import mbs_csi.controller.adapter, mbs_csi.controller.migration, mbs_csi.node.brick'; "
        + "; ".join(f"command -v {tool} >/dev/null" for tool in HOST_TOOLS),
    )


def test_no_build_tools_docs_tests_or_second_python(image: str):
    found = shell(
        image,
        # Build tools and headers; pip itself.
        "for tool in gcc cc make pip pip3; do command -v $tool || true; done; "
        "ls -d /usr/include/python3* /opt/mbs-csi/bin/pip* 2>/dev/null || true; "
        # Documentation beyond the copyright files; man pages.
        "find /usr/share/doc -type f ! -name copyright; "
        "find /usr/share/man /usr/share/info -type f 2>/dev/null || true; "
        # The packages' test suites.
        "find /opt/mbs-csi/lib -mindepth 4 -type d \\( -name tests -o -name test \\); "
        # Any Python interpreter but Debian's 3.11, which the virtualenv links to.
        "find / -xdev -type f -path '*bin/python*' ! -path /usr/bin/python3.11; "
        "readlink -f /opt/mbs-csi/bin/python",
        user="0",
    )
    assert found.split() == ["/usr/bin/python3.11"], found


def test_unused_cinder_clients_are_left_out_and_identities_removed(image: str):
    done = podman_run(image, "-c", "import googleapiclient", entrypoint="python")
    assert done.returncode == 1 and "ModuleNotFoundError" in done.stderr
    assert shell(image, "ls /etc/iscsi/initiatorname.iscsi /etc/nvme/hostnqn 2>/dev/null || true") == ""


def test_the_image_is_slim(image: str):
    size = int(
        subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True, check=True
        ).stdout
    )
    assert size < MAX_SIZE, f"{size / 1024**2:.0f} MiB"


def test_unknown_install_options_are_refused():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--runtime"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
