#!/usr/bin/env bash
# Install mbs-csi into a virtualenv on Debian 12, as root.
#   scripts/install.sh                     the driver, both roles (controller stack + os-brick) and the
#                                          host tools the node role runs, as an editable install
#   scripts/install.sh --dev               plus everything the test suite needs
#   scripts/install.sh --no-editable       a copy of the package instead of an editable install
#   scripts/install.sh --image             a copy, slimmed for the image's builder stage: the Cinder
#                                          drivers' client packages named in MBS_CSI_CINDER_EXTRAS (cinder's
#                                          extras, e.g. pure,hpe3par) added, the packages named in
#                                          MBS_CSI_UNUSED_CLIENTS removed, and no test suites or pip left
#   scripts/install.sh --image-deps        only the dependencies of --image (a build layer of their own:
#                                          a later --image then installs just the package)
#   scripts/install.sh --runtime-packages  only the Debian packages the driver runs with, no virtualenv
#                                          (the image's final stage; every other mode installs them too)
# The virtualenv is ./.venv unless MBS_CSI_VENV says otherwise. Safe to run again: apt and pip are
# skipped when nothing they would install is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MBS_CSI_VENV:-$PWD/.venv}
dev=0 runtime_only=0 editable=1 image=0 deps_only=0
for arg in "$@"; do
  case $arg in
    --dev) dev=1 ;;
    --runtime-packages) runtime_only=1 ;;
    --no-editable) editable=0 ;;
    --image) editable=0 image=1 ;;
    --image-deps) editable=0 image=1 deps_only=1 ;;
    *) echo "usage: $0 [--dev] [--no-editable] | --image | --image-deps | --runtime-packages" >&2; exit 2 ;;
  esac
done

# What the driver runs with: Debian's Python 3.11 (Debian's rados/rbd modules are built for it), the
# filesystem tools, the initiators and tools os-brick calls on nodes (iSCSI, multipath, NVMe-oF, SCSI
# inquiries, Ceph RBD), the Ceph client the RBD driver uses on the controller, and tini, the image's init.
runtime_packages=(python3 util-linux e2fsprogs xfsprogs btrfs-progs open-iscsi multipath-tools nvme-cli sg3-utils ceph-common python3-rados python3-rbd tini)
# What building the virtualenv needs on top (some wheels compile C).
build_packages=(python3-venv python3-dev gcc)
# The test suite: PostgreSQL, a throwaway Ceph cluster, Go with text/template's helm functions (sprig)
# and a YAML library for tests/helm_render, the chart renderer, and what scripts/build-image.sh builds
# and tests/test_image.py runs the image with (podman, buildah, runc for hosts with hybrid cgroups,
# netavark, podman's network helper, which it records on first use, and debootstrap for the base).
dev_packages=(postgresql ceph-mon ceph-osd ceph-mgr golang-go golang-github-masterminds-sprig-dev golang-github-ghodss-yaml-dev
  podman buildah runc netavark debootstrap)

install_debian_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

if ((runtime_only)); then
  ((dev == 0 && editable == 1)) || { echo "--runtime-packages takes no other option" >&2; exit 2; }
  install_debian_packages "${runtime_packages[@]}"
  exit 0
fi

packages=("${runtime_packages[@]}" "${build_packages[@]}")
((dev)) && packages+=("${dev_packages[@]}")
install_debian_packages "${packages[@]}"

python=/usr/bin/python3
extras=controller,node
((dev)) && extras+=,dev
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
stamp=$venv/.mbs-csi-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD editable $extras"
have=$(cat "$stamp" 2>/dev/null || true)
if ((image)); then
  # The dependencies (with the Cinder drivers' clients asked for, without the unused ones), unless
  # --image-deps installed them already from the same pyproject.toml; then the package alone.
  cinder_extras=${MBS_CSI_CINDER_EXTRAS:-} unused=${MBS_CSI_UNUSED_CLIENTS:-}
  want="$(sha256sum pyproject.toml | cut -d' ' -f1) image $extras [$cinder_extras] [$unused]"
  if [[ $have != "$want" ]]; then
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q ".[$extras]" ${cinder_extras:+"cinder[$cinder_extras]"}
    [[ -z $unused ]] || "$venv/bin/pip" uninstall -q -y $unused
    echo "$want" >"$stamp"
  fi
  if ((!deps_only)); then
    "$venv/bin/pip" install -q --no-deps --force-reinstall .
    rm -f "$stamp"
  fi
# An editable install follows the sources, so only a changed pyproject.toml calls for pip again; a dev
# install already holds everything a plain one would add. A copy (--no-editable) is always refreshed.
elif ((!editable)) || [[ $have != "$want" && $have != "$want,dev" ]]; then
  rm -f "$stamp"
  "$venv/bin/pip" install -q --upgrade pip
  if ((editable)); then
    "$venv/bin/pip" install -q -e ".[$extras]"
  else
    "$venv/bin/pip" install -q ".[$extras]"
  fi
  if ((dev)); then
    # Test-only: stubs generated from the official CSI v1.1.0 proto, for the wire-compatibility test.
    # Its own dependencies are a 2021 stack we do not want; the test reads the stub file, never imports it.
    "$venv/bin/pip" install -q --no-deps ember-csi==0.9.1
  fi
  if ((editable)); then
    echo "$want" >"$stamp"
  fi
fi

# Debian's rados/rbd modules (python3-rados, python3-rbd), and only those, into the virtualenv: the RBD
# driver and the Ceph tests import them, and all of /usr/lib/python3/dist-packages would shadow the
# pinned controller stack.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
for module in /usr/lib/python3/dist-packages/{rados,rbd}.cpython-*.so; do
  ln -sfn "$module" "$site/"
done

if ((image && !deps_only)); then
  # Nor does the image keep the packages' own test suites, or pip.
  find "$site" -depth -mindepth 2 -type d \( -name tests -o -name test \) -exec rm -rf {} +
  "$venv/bin/python" -m pip uninstall -q -y pip
fi
