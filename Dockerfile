# syntax=docker/dockerfile:1
# One image for both roles of mbs-csi:
#   controller: mbs-csi serve --role controller   (runs as the image's user, uid 10001)
#   node:       mbs-csi serve --role node         (needs root and a privileged pod)
# Both stages install through scripts/install.sh. Build with scripts/build-image.sh (which also builds
# where no image registry is reachable), or:
#
#   docker build -t mbs-csi:0.1.0 .
#   docker build -t mbs-csi:0.1.0 --build-arg CINDER_EXTRAS=pure,hpe3par .
#
# CINDER_EXTRAS: cinder's extras for the client packages of the Cinder drivers the image will serve
# (pure, hpe3par, storpool, infinidat, linstor, ...; none by default: RBD, LVM, NFS and most iSCSI/FC
# drivers need none). UNUSED_CLIENTS: cinder requirements left out of the image, which only its backup
# targets and the VMware and Windows drivers use (set it to "" to keep them all).

FROM debian:12-slim AS builder
ARG CINDER_EXTRAS=""
ARG UNUSED_CLIENTS="google-api-python-client boto3 botocore s3transfer oslo.vmware suds-community os-win"
WORKDIR /src
COPY pyproject.toml ./
COPY scripts/install.sh scripts/
# Debian packages (runtime and build) and the dependencies, in a layer that only pyproject.toml,
# install.sh and the build args decide (the package's sources are stand-ins here); then the package
# itself (without the stand-ins' build directory, whose files would be newer than the sources), and the
# slimming (--image). pip trusts the CA bundle given as the build secret pip-ca when there is one
# (scripts/build-image.sh passes the host's where the package index is reached through a proxy with its
# own CA); a secret is in no layer.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && mkdir -p mbs_csi csi && touch README.md mbs_csi/__init__.py csi/__init__.py \
    && MBS_CSI_VENV=/opt/mbs-csi MBS_CSI_CINDER_EXTRAS="$CINDER_EXTRAS" MBS_CSI_UNUSED_CLIENTS="$UNUSED_CLIENTS" \
       bash scripts/install.sh --image-deps
COPY README.md ./
COPY csi csi
COPY mbs_csi mbs_csi
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && rm -rf build ./*.egg-info \
    && MBS_CSI_VENV=/opt/mbs-csi MBS_CSI_CINDER_EXTRAS="$CINDER_EXTRAS" MBS_CSI_UNUSED_CLIENTS="$UNUSED_CLIENTS" \
       bash scripts/install.sh --image

FROM debian:12-slim
LABEL org.opencontainers.image.title="mbs-csi" \
      org.opencontainers.image.description="CSI driver serving volumes from any Cinder-supported storage through cinderlib and os-brick" \
      org.opencontainers.image.licenses="Apache-2.0"
# Only the runtime Debian packages (no compiler, no Python headers), without their documentation. The
# initiator identities the packages generate are removed: a node mounts the host's /etc/iscsi and
# /etc/nvme, so every node keeps its own.
RUN --mount=type=bind,source=scripts/install.sh,target=/tmp/mbs-csi/scripts/install.sh \
    printf '%s\n' 'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \
        'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*' 'path-exclude=/usr/share/lintian/*' \
        'path-exclude=/usr/share/locale/*' 'path-include=/usr/share/locale/locale.alias' \
        >/etc/dpkg/dpkg.cfg.d/mbs-csi-no-docs \
    && bash /tmp/mbs-csi/scripts/install.sh --runtime-packages \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
    && rm -f /etc/iscsi/initiatorname.iscsi /etc/nvme/hostnqn /etc/nvme/hostid \
    && groupadd --system --gid 10001 mbs-csi \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/mbs-csi --no-create-home \
       --shell /usr/sbin/nologin mbs-csi \
    && install -d -o 10001 -g 10001 /var/lib/mbs-csi
COPY --from=builder /opt/mbs-csi /opt/mbs-csi
ENV PATH=/opt/mbs-csi/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The controller's user; the node plugin's pod runs as root (runAsUser: 0), as does the controller with
# the loopback backend, which calls losetup.
USER 10001
ENTRYPOINT ["/usr/bin/tini", "--", "mbs-csi"]
CMD ["serve"]
