#!/usr/bin/env bash
# Build the mbs-csi image from the Dockerfile.
#   scripts/build-image.sh [-t TAG] [-- BUILD-ARGS...]
#     -t TAG      the image's name (default mbs-csi:VERSION)
#     BUILD-ARGS  passed to the build, e.g. --build-arg CINDER_EXTRAS=pure
#   scripts/build-image.sh --engine-options   print the options podman needs on this host, one a line
#                                             (for `podman run` of the image too)
# Where a Docker engine runs, `docker build`. Otherwise podman: a plain `podman build` when it can pull
# the base image `debian:12-slim`; when no image registry is reachable, the base is made here with
# debootstrap from this host's Debian mirror (kept in MBS_CSI_IMAGE_CACHE, default
# /var/cache/mbs-csi-image, and made again after 30 days or when removed), and the build's pip trusts the
# host's CA bundle, handed to that build only as a secret. As root, on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
tag=mbs-csi:$version print_options=0
while (($#)); do
  case $1 in
    -t) tag=$2; shift 2 ;;
    --engine-options) print_options=1; shift ;;
    --) shift; break ;;
    *) echo "usage: $0 [-t TAG] [-- BUILD-ARGS...] | --engine-options" >&2; exit 2 ;;
  esac
done
base=docker.io/library/debian:12-slim
cache=${MBS_CSI_IMAGE_CACHE:-/var/cache/mbs-csi-image}
ca_bundle=/etc/ssl/certs/ca-certificates.crt

# Where cgroup v1 and v2 are mounted side by side (hybrid), crun refuses to run anything: use runc. And
# podman asks for more open files and processes than a host without CAP_SYS_RESOURCE may grant: ask for
# less (tests/test_image.py runs the image with the same options).
engine=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
[[ -d /sys/fs/cgroup/unified ]] && command -v runc >/dev/null && engine+=(--runtime runc)
if ((print_options)); then
  printf '%s\n' "${engine[@]}"
  exit 0
fi

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  exec docker build -t "$tag" "$@" .
fi

# The host's Debian mirror, as its apt sources name it (deb822 or one-line format).
host_mirror() {
  local found
  found=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1)
  [[ -n $found ]] || found=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  [[ -n $found ]] || { echo "no Debian mirror in this host's apt sources" >&2; return 1; }
  echo "$found"
}

# debian:12-slim as its makers make it: the minbase variant (only essential and required packages,
# apt), no documentation, man pages or translations (dpkg excludes them), no apt lists or downloads.
make_base() {
  local mirror root
  mirror=$(host_mirror)
  mkdir -p "$cache"
  root=$(mktemp -d "$cache/root.XXXXXX")
  trap 'rm -rf "$root"' RETURN
  echo "making $base with debootstrap from $mirror"
  debootstrap --variant=minbase bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -n 20 "$cache/debootstrap.log" >&2; return 1; }
  printf '%s\n' 'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \
    'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/groff/*' 'path-exclude=/usr/share/info/*' \
    'path-exclude=/usr/share/lintian/*' 'path-exclude=/usr/share/linda/*' \
    'path-exclude=/usr/share/locale/*' 'path-include=/usr/share/locale/locale.alias' \
    >"$root/etc/dpkg/dpkg.cfg.d/docker"
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/* "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/*
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  # The same sources as the host, so that the build's apt reaches the same mirror.
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" >"$root/etc/apt/sources.list"
  tar --numeric-owner -C "$root" -cf "$cache/debian-12-slim.tar.new" .
  mv "$cache/debian-12-slim.tar.new" "$cache/debian-12-slim.tar"
}

secret=()
made=$(podman image inspect --format '{{index .Labels "mbs-csi.base"}}' "$base" 2>/dev/null || true)
if podman image exists "$base" && [[ -z $made ]]; then
  :  # pulled before
elif [[ -z $made ]] && timeout 60 podman pull -q "$base" >/dev/null 2>&1; then
  :  # a registry answers
else
  if [[ ! -s $cache/debian-12-slim.tar ]] || [[ -n $(find "$cache/debian-12-slim.tar" -mtime +30) ]]; then
    make_base
  fi
  stamp=$(stat -c %Y "$cache/debian-12-slim.tar")
  if [[ $made != "$stamp" ]]; then
    podman import --change "LABEL mbs-csi.base=$stamp" --change 'CMD ["bash"]' \
      "$cache/debian-12-slim.tar" "$base" >/dev/null
  fi
  [[ -s $ca_bundle ]] && secret=(--secret "id=pip-ca,src=$ca_bundle")
fi
# The builder stage is built and tagged first ("TAG-builder"), so that it stays as the next build's cache;
# then the image. The images these tags named before are removed once the tags move (the layers the new
# ones share stay).
build() {
  local tag=$1 previous
  shift
  previous=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
  podman build --pull=never --network=host --layers --jobs=2 "${engine[@]}" "${secret[@]}" -t "$tag" "$@" .
  if [[ -n $previous && $previous != $(podman image inspect --format '{{.Id}}' "$tag") ]]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
  fi
}
build "$tag-builder" --target builder "$@"
build "$tag" "$@"
