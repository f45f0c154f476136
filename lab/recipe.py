"""What goes into the guest image: packages and the files written into the root filesystem.

Everything here is part of the image cache key (a change rebuilds the image).
"""

from __future__ import annotations

GUEST_HOSTNAME = "zvolt-lab"
VENV = "/opt/zvolt/venv"
IMAGE_SIZE = "6G"

# debootstrap --include: enough for apt to run well inside the chroot.
BOOTSTRAP_INCLUDE = ("ca-certificates", "gnupg", "apt-utils")

# From bookworm (main).
BASE_PACKAGES = (
    "openssh-server", "systemd-sysv", "udev", "kmod", "iproute2", "util-linux", "procps",
    "python3", "python3-venv", "e2fsprogs", "socat", "postgresql", "dbus", "initramfs-tools",
    "psmisc", "less", "zstd",
    # nft: the node plugin and the agent install their NVMe/TCP guard (zvolt/nftguard.py).
    "nftables",
    # A lab kubelet (its binary comes from $ZVOLT_K8S_BIN at test time): the container runtime and
    # the CNI plugins; iptables for the bridge plugin's masquerade rules.
    "containerd", "runc", "containernetworking-plugins", "iptables",
)

# From bookworm-backports in one transaction (the kernel and the stack that matches it).
BACKPORTS_PACKAGES = ("linux-image-amd64", "zfsutils-linux", "python3-pyzfs", "nvme-cli", "fio", "xfsprogs")

# Needed only to build the ZFS module; purged afterwards (the module is kept from a tarball).
BUILD_ONLY = ("zfs-dkms", "dkms", "gcc", "make", "linux-compiler-gcc-12-x86")

# Units that slow boot or act on pools/services by themselves; the lab does these explicitly.
MASKED_UNITS = (
    "systemd-udev-settle.service",
    "zfs-import-cache.service",
    "zfs-import-scan.service",
    "zfs-import.target",
    "zfs-mount.service",
    "zfs-share.service",
    "zfs-zed.service",
    "zfs-volume-wait.service",
    "zfs-load-key.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
    "getty@tty1.service",
    "nvmf-autoconnect.service",
    "nvmefc-boot-connections.service",
)
# containerd starts only when a kubelet test asks for it (it costs boot time and memory otherwise).
DISABLED_UNITS = ("postgresql.service", "containerd.service")
ENABLED_UNITS = ("systemd-networkd.service", "ssh.service")

FILES: dict[str, str] = {
    "/etc/hostname": f"{GUEST_HOSTNAME}\n",
    "/etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {GUEST_HOSTNAME}\n",
    "/etc/fstab": (
        "/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1\n"
        "src /src 9p trans=virtio,version=9p2000.L,ro,msize=262144,nofail 0 0\n"
    ),
    "/etc/systemd/network/10-eth.network": "[Match]\nName=e*\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\n",
    "/etc/ssh/sshd_config.d/zvolt-lab.conf": (
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
        "ClientAliveInterval 15\n"
        # Tests multiplex many commands over one connection.
        "MaxSessions 64\nMaxStartups 64:30:128\n"
    ),
    "/etc/modules-load.d/zvolt-lab.conf": "9pnet_virtio\n9p\n",
    "/etc/systemd/journald.conf.d/zvolt-lab.conf": "[Journal]\nStorage=volatile\nRuntimeMaxUse=64M\n",
    "/etc/systemd/system.conf.d/zvolt-lab.conf": "[Manager]\nDefaultTimeoutStopSec=10s\n",
    "/etc/apt/apt.conf.d/90zvolt-lab": 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n',
    "/etc/dpkg/dpkg.cfg.d/90zvolt-lab": (
        "path-exclude=/usr/share/doc/*\npath-exclude=/usr/share/man/*\npath-exclude=/usr/share/info/*\n"
        "path-exclude=/usr/share/locale/*\npath-include=/usr/share/locale/locale.alias\n"
    ),
    "/usr/sbin/policy-rc.d": "#!/bin/sh\n# no daemons start inside the build chroot\nexit 101\n",
    "/etc/initramfs-tools/conf.d/zvolt-lab": "MODULES=most\nCOMPRESS=zstd\n",
    "/etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\next4\n",
}
