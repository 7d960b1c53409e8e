# syntax=docker/dockerfile:1
# One image for both roles of mbs-csi:
#   controller: mbs-csi serve --role controller   (runs as the image's user, uid 10001)
#   node:       mbs-csi serve --role node         (needs root and a privileged pod)
# Both stages install through scripts/install.sh, the script the test command runs (with --dev).
#
#   docker build -t mbs-csi:0.1.0 .

FROM debian:12-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/
COPY csi csi
COPY mbs_csi mbs_csi
# Debian packages (runtime and build), the virtualenv with a copy of the package, Debian's rados/rbd
# modules linked into it.
RUN --mount=type=cache,target=/root/.cache/pip \
    MBS_CSI_VENV=/opt/mbs-csi bash scripts/install.sh --no-editable

FROM debian:12-slim
LABEL org.opencontainers.image.title="mbs-csi" \
      org.opencontainers.image.description="CSI driver serving volumes from any Cinder-supported storage through cinderlib and os-brick" \
      org.opencontainers.image.licenses="Apache-2.0"
# Only the runtime Debian packages: no compiler, no Python headers. The initiator identities the packages
# generate are removed: a node mounts the host's /etc/iscsi and /etc/nvme, so every node keeps its own.
RUN --mount=type=bind,source=scripts/install.sh,target=/tmp/mbs-csi/scripts/install.sh \
    bash /tmp/mbs-csi/scripts/install.sh --runtime-packages \
    && rm -rf /var/lib/apt/lists/* \
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
