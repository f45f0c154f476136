# syntax=docker/dockerfile:1
# One image for the three zvolt roles; the Helm chart picks the command and the user:
#   zvolt-agent            storage nodes (root, privileged: ZFS ioctls, nvmet configfs)
#   zvolt-csi --mode node  every worker (root, privileged: nvme connect, mkfs, mount)
#   both install the NVMe/TCP guard with nft (nftables); the agent finds its storage-network
#   address with ip (iproute2)
#   zvolt-csi --mode controller   unprivileged, the image's default user
#
# The Debian release is pinned by codename (bookworm, as in the lab guest); ZFS userland
# comes from bookworm-backports contrib so it matches the lab's ZFS 2.3 kernel module.
FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive

SHELL ["/bin/sh", "-eu", "-c"]

# hadolint ignore=DL3008
RUN printf '%s\n' \
        'Types: deb' \
        'URIs: http://deb.debian.org/debian' \
        'Suites: bookworm-backports' \
        'Components: main contrib' \
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        > /etc/apt/sources.list.d/zvolt-backports.sources; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        ca-certificates \
        e2fsprogs \
        iproute2 \
        kmod \
        nftables \
        nvme-cli \
        python3 \
        python3-venv \
        util-linux \
        xfsprogs; \
    apt-get install -y --no-install-recommends -t bookworm-backports \
        python3-pyzfs \
        zfsutils-linux; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# --system-site-packages: libzfs_core comes from Debian's python3-pyzfs, not PyPI.
ENV VIRTUAL_ENV=/opt/zvolt/venv \
    PATH=/opt/zvolt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY . /opt/zvolt/src

# The project with its runtime dependencies (pinned in pyproject.toml) and the Kubernetes
# client the controller uses to find the agents; the source tree is dropped afterwards.
# Bytecode is compiled here, once: the root filesystem is read-only at run time
# (PYTHONDONTWRITEBYTECODE), and without it every container start compiled the Kubernetes
# client again (3 minutes per start in the lab's emulated guest, past the liveness probes).
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV"; \
    "$VIRTUAL_ENV/bin/pip" install --no-cache-dir "/opt/zvolt/src[kube]"; \
    rm -rf /opt/zvolt/src; \
    "$VIRTUAL_ENV/bin/python" -c 'import zvolt, grpc, kubernetes, libzfs_core'

# The controller runs as this unprivileged user; agent and node override it (runAsUser 0).
RUN groupadd --system --gid 65532 zvolt; \
    useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin zvolt

WORKDIR /
USER 65532:65532
