"""Host packages the lab needs, installed with apt when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from lab.steps import Steps, clean_env

HOST_PACKAGES = ("qemu-system-x86", "qemu-utils", "debootstrap", "zstd", "openssh-client", "e2fsprogs")


def missing(packages: Sequence[str] = HOST_PACKAGES) -> list[str]:
    out = []
    for pkg in packages:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
        )
        if "install ok installed" not in proc.stdout:
            out.append(pkg)
    return out


def apt_install_argv(packages: Sequence[str]) -> list[list[str]]:
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    return [
        [*prefix, "apt-get", "update", "-qq"],
        [*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ]


def ensure(steps: Steps) -> None:
    need = missing()
    if not need:
        steps.note("host packages", "installed")
        return
    with steps.step("host packages"):
        for argv in apt_install_argv(need):
            steps.run(argv, env=clean_env(), timeout=900)


def qemu_available() -> tuple[bool, str]:
    """Whether qemu can run here at all (installed, or installable with apt)."""
    if shutil.which("qemu-system-x86_64"):
        return True, "qemu-system-x86_64 found"
    if shutil.which("apt-get") and (os.geteuid() == 0 or shutil.which("sudo")):
        return True, "qemu-system-x86 installable with apt"
    return False, "qemu-system-x86_64 is not installed and cannot be installed (no apt/root)"
