"""Find the guest kernel and ZFS versions from a private apt lists dir (no debootstrap needed).

The image cache key needs them before anything is built; the host's own apt state is never
touched (separate sources, lists, cache and status file).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from lab.steps import Steps, clean_env

MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
SUITE = "bookworm"
BACKPORTS = f"{SUITE}-backports"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
COMPONENTS = "main contrib"
# Versions move rarely; refresh the private lists at most this often.
LISTS_MAX_AGE = 6 * 3600


def sources_list(keyring: str | None = KEYRING) -> str:
    opt = f"[signed-by={keyring}] " if keyring else ""
    return "".join(
        [
            f"deb {opt}{MIRROR} {SUITE} {COMPONENTS}\n",
            f"deb {opt}{MIRROR} {SUITE}-updates {COMPONENTS}\n",
            f"deb {opt}{SECURITY_MIRROR} {SUITE}-security {COMPONENTS}\n",
            f"deb {opt}{MIRROR} {BACKPORTS} {COMPONENTS}\n",
        ]
    )


@dataclass(frozen=True)
class Versions:
    kernel: str  # e.g. "6.12.95+deb12-amd64" (the guest `uname -r`)
    kernel_pkg: str  # version of linux-image-amd64 in backports
    zfs: str  # version of zfsutils-linux in backports


def apt_opts(root: Path) -> list[str]:
    return [
        "-o", f"Dir::Etc::SourceList={root / 'sources.list'}",
        "-o", f"Dir::Etc::SourceParts={root / 'sources.list.d'}",
        "-o", f"Dir::State::Lists={root / 'lists'}",
        "-o", f"Dir::State::status={root / 'status'}",
        "-o", f"Dir::Cache={root / 'cache'}",
        "-o", "Acquire::Languages=none",
        "-o", "APT::Sandbox::User=root",
    ]


def backports_version(madison: str, package: str) -> str:
    """Pick the backports version out of `apt-cache madison` output."""
    for line in madison.splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) >= 3 and cols[0] == package and f" {BACKPORTS}/" in f" {cols[2]}":
            return cols[1]
    raise RuntimeError(f"{package} not found in {BACKPORTS}")


def kernel_release(show: str) -> str:
    """The versioned image package linux-image-amd64 depends on → the guest kernel release."""
    for line in show.splitlines():
        if line.startswith("Depends:"):
            m = re.search(r"linux-image-(\d[^\s,]*-amd64)\b", line)
            if m:
                return m.group(1)
    raise RuntimeError("linux-image-amd64 has no versioned linux-image dependency")


def resolve(steps: Steps, root: Path) -> Versions:
    with steps.step("resolve versions"):
        (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "sources.list.d").mkdir(parents=True, exist_ok=True)
        (root / "status").touch()
        src = sources_list()
        stamp = root / "updated"
        fresh = (
            stamp.exists()
            and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE
            and (root / "sources.list").exists()
            and (root / "sources.list").read_text() == src
        )
        if not fresh:
            (root / "sources.list").write_text(src)
            steps.run(["apt-get", *apt_opts(root), "update", "-q"], env=clean_env(), timeout=600)
            stamp.touch()
        opts = apt_opts(root)
        env = clean_env()
        kpkg = backports_version(steps.capture(["apt-cache", *opts, "madison", "linux-image-amd64"], env=env),
                                 "linux-image-amd64")
        kver = kernel_release(steps.capture(["apt-cache", *opts, "show", f"linux-image-amd64={kpkg}"], env=env))
        zfs = backports_version(steps.capture(["apt-cache", *opts, "madison", "zfsutils-linux"], env=env),
                                "zfsutils-linux")
    return Versions(kernel=kver, kernel_pkg=kpkg, zfs=zfs)
