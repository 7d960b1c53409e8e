#!/usr/bin/env bash
# Install mbs-csi into a virtualenv on Debian 12, as root.
#   scripts/install.sh          the driver, both roles (controller stack + os-brick)
#   scripts/install.sh --dev    plus everything the test suite needs
# The virtualenv is ./.venv unless MBS_CSI_VENV says otherwise. Safe to run again: apt and pip are
# skipped when nothing they would install is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MBS_CSI_VENV:-$PWD/.venv}
dev=0
[[ ${1:-} == --dev ]] && dev=1

# Debian's own Python 3.11: Debian's rados/rbd modules (the Ceph tests) are built for it.
python=/usr/bin/python3
apt_packages=(python3 python3-venv python3-dev gcc util-linux e2fsprogs xfsprogs btrfs-progs)
((dev)) && apt_packages+=(postgresql ceph-mon ceph-osd ceph-mgr ceph-common python3-rados python3-rbd)

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

extras=controller,node
((dev)) && extras+=,dev
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
stamp=$venv/.mbs-csi-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras $PWD"
have=$(cat "$stamp" 2>/dev/null || true)
# A dev install already holds everything a plain one would add.
if [[ $have != "$want" && $have != "$want,dev" ]]; then
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e ".[$extras]"
  if ((dev)); then
    # Test-only: stubs generated from the official CSI v1.1.0 proto, for the wire-compatibility test.
    # Its own dependencies are a 2021 stack we do not want; the test reads the stub file, never imports it.
    "$venv/bin/pip" install -q --no-deps ember-csi==0.9.1
  fi
  echo "$want" >"$stamp"
fi

if ((dev)); then
  # Debian's rados/rbd modules (python3-rados, python3-rbd), and only those, into the virtualenv:
  # all of /usr/lib/python3/dist-packages would shadow the pinned controller stack.
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  for module in /usr/lib/python3/dist-packages/{rados,rbd}.cpython-*.so; do
    ln -sfn "$module" "$site/"
  done
fi
