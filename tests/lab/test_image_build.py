"""The zvolt image, built for real from the project's Dockerfile with buildah (`zvolt-lab
oci-image`): a Debian base made from Debian packages, no daemon, no registry. The tests run
the entry points inside it, check its user and that it holds only what the Dockerfile says,
and check the OCI archive a containerd node imports.

Needs root (buildah's chroot isolation) and the Debian and PyPI mirrors. Does not use the
lab guest. Cache: ~/.cache/zvolt-image ($ZVOLT_IMAGE_CACHE).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.oci_image import Buildah, Built, ImageCache, build

REPO = Path(__file__).resolve().parents[2]
USER = "65532:65532"  # Dockerfile USER; the chart's controller runs as it (values.yaml)
PROJECT_PACKAGES = {"zvolt", "agent", "csi", "kubectl_zvolt"}  # .dockerignore's allow-list
LEFT_OUT = {"lab", "bench", "tests"}

pytestmark = [pytest.mark.lab]


@dataclass(frozen=True)
class Image:
    built: Built
    buildah: Buildah
    container: str
    rootfs: Path

    def run(self, argv: list[str], user: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.buildah.run_argv(self.container, argv, user=user),
                              capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (buildah with chroot isolation)")
    cache = ImageCache.from_env()
    built = build(cache, REPO, sys.stderr)
    buildah = Buildah.for_cache(cache)
    container = subprocess.run(buildah.argv("from", "--pull=never", built.tag),
                               capture_output=True, text=True, check=True).stdout.strip()
    try:
        rootfs = Path(subprocess.run(buildah.argv("mount", container),
                                     capture_output=True, text=True, check=True).stdout.strip())
        yield Image(built, buildah, container, rootfs)
    finally:
        subprocess.run(buildah.argv("rm", container), capture_output=True, check=False)


def test_entry_points_run_as_the_documented_unprivileged_user(image: Image) -> None:
    proc = image.run(["id"])
    assert proc.returncode == 0 and proc.stdout.startswith("uid=65532(zvolt) gid=65532(zvolt)"), proc
    for command in (["zvolt-agent", "--help"], ["zvolt-csi", "--help"]):
        proc = image.run(command)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), f"{command}: {proc.stderr[-2000:]}"
    proc = image.run(["python", "-c", "import zvolt, kubernetes, grpc, csi.main"])
    assert proc.returncode == 0, proc.stderr
    passwd = (image.rootfs / "etc/passwd").read_text()
    assert "zvolt:x:65532:65532::/nonexistent:/usr/sbin/nologin" in passwd.splitlines()


def test_image_config_is_the_dockerfiles(image: Image) -> None:
    proc = subprocess.run(image.buildah.argv("inspect", "--type", "image", image.built.tag),
                          capture_output=True, text=True, check=True)
    config = json.loads(proc.stdout)["OCIv1"]["config"]
    assert config["User"] == USER
    assert config.get("WorkingDir", "/") == "/"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["VIRTUAL_ENV"] == "/opt/zvolt/venv" and env["PATH"].startswith("/opt/zvolt/venv/bin:")


def test_root_roles_find_their_tools(image: Image) -> None:
    """What the agent and node plugin run as root (privileged) in the image."""
    for argv in (["nvme", "version"], ["mkfs.ext4", "-V"], ["mkfs.xfs", "-V"], ["blkid", "--version"],
                 ["modprobe", "--version"], ["which", "zfs", "zpool"], ["nft", "--version"],
                 ["ip", "-j", "-4", "addr", "show"],
                 ["python", "-c", "import libzfs_core, grpc, google.protobuf, prometheus_client, kubernetes, zvolt"]):
        proc = image.run(argv, user="0")
        assert proc.returncode == 0, f"{argv}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    proc = image.run(["dpkg-query", "-W", "-f", "${Version}\\n", "zfsutils-linux", "python3-pyzfs"], user="0")
    versions = proc.stdout.split()
    # ZFS userland from bookworm-backports (2.3+), matching the lab's kernel module.
    assert len(versions) == 2 and all(re.match(r"2\.([3-9]|\d\d)", v) and "bpo12" in v for v in versions), versions


def test_image_holds_only_the_documented_files(image: Image) -> None:
    root = image.rootfs
    assert sorted(p.name for p in (root / "opt").iterdir()) == ["zvolt"]
    assert sorted(p.name for p in (root / "opt/zvolt").iterdir()) == ["venv"], "the source tree must be dropped"
    # No build tools: the Dockerfile installs wheels only.
    for tool in ("gcc", "cc", "c++", "make", "git", "curl"):
        assert not (root / "usr/bin" / tool).exists(), f"/usr/bin/{tool} in the image"
    assert not (root / "usr/include/python3.11").exists()
    # apt and pip leave nothing behind; the build's $HOME got no writes (no pip cache) and
    # the build-time mounts left no mount points.
    assert [p.name for p in (root / "var/lib/apt/lists").iterdir() if p.name not in {"lock", "partial"}] == []
    assert list((root / "var/cache/apt/archives").glob("*.deb")) == []
    assert sorted(p.name for p in (root / "root").iterdir()) == [".bashrc", ".profile"]
    assert image.built.home_writes == [], image.built.home_writes
    assert not (root / "etc/pip.conf").exists()
    site = next((root / "opt/zvolt/venv/lib").glob("python3*/site-packages"))
    top = {p.name for p in site.iterdir() if p.is_dir()}
    assert top >= PROJECT_PACKAGES and not LEFT_OUT & top, top & LEFT_OUT
    # Compiled at build time (nothing can be written at run time): a start imports, never compiles.
    for pkg in (*PROJECT_PACKAGES, "kubernetes"):
        assert any((site / pkg).rglob("__pycache__/*.pyc")), f"{pkg} has no bytecode in the image"
    # The slim base's dpkg filter holds for the Dockerfile's packages too.
    assert not any((root / "usr/share/man").rglob("*.gz"))
    for binary in ("usr/sbin/nft", "usr/bin/ip", "sbin/zfs", "sbin/zpool", "usr/sbin/nvme", "sbin/mkfs.ext4",
                   "sbin/mkfs.xfs", "opt/zvolt/venv/bin/zvolt-agent", "opt/zvolt/venv/bin/zvolt-csi"):
        assert (root / binary).exists(), binary


def test_oci_archive_names_the_image_for_containerd(image: Image, capsys: pytest.CaptureFixture[str]) -> None:
    with tarfile.open(image.built.archive) as tar:
        names = set(tar.getnames())
        assert {"oci-layout", "index.json"} <= names
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        [manifest] = index["manifests"]
        # ctr images import names the image from this annotation.
        assert manifest["annotations"]["org.opencontainers.image.ref.name"] == image.built.tag
        digest = manifest["digest"].split(":", 1)[1]
        body = json.loads(tar.extractfile(f"blobs/sha256/{digest}").read())  # type: ignore[union-attr]
        for layer in body["layers"]:
            assert f"blobs/sha256/{layer['digest'].split(':', 1)[1]}" in names
    with capsys.disabled():
        print(f"\nimage {image.built.tag}: {image.built.size / 1e6:.0f} MB "
              f"(built in {image.built.build_seconds:.0f}s); OCI archive "
              f"{image.built.archive_size / 1e6:.0f} MB, {len(body['layers'])} layers")
