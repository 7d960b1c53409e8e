"""The Dockerfile, read rather than built (no container engine here): it installs only through
scripts/install.sh in modes whose steps the test command exercises, and its final stage holds no build
tools."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from testkit.host import REPO

INSTALL = REPO / "scripts" / "install.sh"
# Modes of scripts/install.sh the image may use. --runtime-packages installs the runtime_packages list
# with the same function every other mode (--dev included) installs it with; --no-editable only drops
# pip's -e from the install the test command runs.
IMAGE_MODES = {"--runtime-packages", "--no-editable"}
BUILD_TOOLS = {"gcc", "g++", "make", "build-essential", "python3-dev", "python3-venv", "libpython3-dev"}


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped), one list per stage."""
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    result: list[list[str]] = []
    for line in filter(None, (ln.strip() for ln in text.splitlines())):
        if line.upper().startswith("FROM "):
            result.append([])
        result[-1].append(line)
    return result


def runs(stage: list[str]) -> list[str]:
    return [line for line in stage if line.upper().startswith("RUN ")]


def install_calls(stage: list[str]) -> list[list[str]]:
    """The options of every scripts/install.sh call in the stage's RUN lines."""
    calls = []
    for line in runs(stage):
        words = shlex.split(line)
        for i, word in enumerate(words[1:], 1):
            if words[i - 1] == "bash" and word.endswith("scripts/install.sh"):
                options = []
                for option in words[i + 1 :]:
                    if not option.startswith("--"):
                        break
                    options.append(option)
                calls.append(options)
    return calls


def runtime_packages() -> list[str]:
    (line,) = re.findall(r"^runtime_packages=\((.*)\)$", INSTALL.read_text(), flags=re.M)
    return line.split()


def test_both_stages_are_debian_12_slim():
    assert [stage[0].split()[1] for stage in stages()] == ["debian:12-slim", "debian:12-slim"]


def test_image_installs_only_through_install_sh_in_modes_the_tests_run():
    for stage in stages():
        assert install_calls(stage), stage[0]
        for line in runs(stage):
            assert not re.search(r"\bapt-get install\b|\bpip3? install\b|\bapt install\b", line), line
        for options in install_calls(stage):
            assert set(options) <= IMAGE_MODES, options
    # The test command installs with scripts/install.sh --dev.
    assert "bash scripts/install.sh --dev" in (REPO / "scripts" / "test.sh").read_text()


def test_builder_installs_a_copy_into_opt_and_the_final_stage_takes_only_that():
    builder, final = stages()
    assert install_calls(builder) == [["--no-editable"]]
    assert any("MBS_CSI_VENV=/opt/mbs-csi" in line for line in runs(builder))
    assert install_calls(final) == [["--runtime-packages"]]
    copies = [line for line in final if line.upper().startswith("COPY ")]
    assert copies == ["COPY --from=builder /opt/mbs-csi /opt/mbs-csi"]


def test_final_stage_has_no_build_tools():
    _builder, final = stages()
    for line in final:
        assert not BUILD_TOOLS & set(re.split(r"[\s=,\"']+", line)), line
    assert not BUILD_TOOLS & set(runtime_packages())
    assert {"open-iscsi", "multipath-tools", "nvme-cli", "ceph-common", "python3-rados", "python3-rbd"} <= set(
        runtime_packages()
    )


def test_controller_user_is_non_root():
    _builder, final = stages()
    assert "USER 10001" in final
    assert any("useradd" in line and "--uid 10001" in line for line in runs(final))


def test_runtime_packages_mode_installs_no_virtualenv(tmp_path: Path):
    """Run the final stage's mode for real: after the test command's --dev install it finds every runtime
    package installed (so the tests run with the host tools the image carries) and makes no virtualenv."""
    venv = tmp_path / "venv"
    proc = subprocess.run(
        ["bash", str(INSTALL), "--runtime-packages"],
        env={**os.environ, "MBS_CSI_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "installing Debian packages" not in proc.stdout, "scripts/install.sh --dev should have installed them"
    assert not venv.exists()


def test_unknown_install_options_are_refused():
    proc = subprocess.run(["bash", str(INSTALL), "--runtime"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert {".git", ".venv"} <= set(patterns)
    sources = ["scripts/install.sh"]
    for stage in stages():
        for line in stage:
            words = line.split()
            if words[0].upper() == "COPY" and not words[1].startswith("--from"):
                sources += words[1:-1]
    for source in sources:
        assert (REPO / source).exists(), source
        assert not any(fnmatch.fnmatch(source, p) or source.startswith(p.rstrip("/") + "/") for p in patterns)


@pytest.mark.slow
def test_the_builder_stage_install_works_from_the_build_context(tmp_path: Path):
    """Run the builder stage's install for real: a copy of just what the Dockerfile COPYs, installed with
    --no-editable into a fresh virtualenv, gives a working mbs-csi with both roles' stacks."""
    context = tmp_path / "src"
    for source in ("pyproject.toml", "README.md", "scripts/install.sh", "csi", "mbs_csi"):
        destination = context / source
        destination.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / source, destination)
    venv = tmp_path / "opt-mbs-csi"
    proc = subprocess.run(
        ["bash", "scripts/install.sh", "--no-editable"],
        cwd=context,
        env={**os.environ, "MBS_CSI_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(context)  # a copy, not a link to the sources: it must work without them
    version = subprocess.run([venv / "bin" / "mbs-csi", "version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip(), version.stderr
    imports = subprocess.run(
        [venv / "bin" / "python", "-c", "import cinderlib, os_brick, rados, rbd, mbs_csi.controller.adapter"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert imports.returncode == 0, imports.stderr
