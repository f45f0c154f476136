"""The argv lab/oci_image.py hands to buildah and mmdebstrap, and the choices behind them."""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import pytest

from lab.oci_image import (
    BaseImage,
    Buildah,
    ImageCache,
    chart_image_ref,
    check_ref,
    storage_driver,
    write_layout_archive,
)

REPO = Path(__file__).resolve().parents[2]


def test_base_comes_from_the_projects_own_dockerfile() -> None:
    base = BaseImage.from_dockerfile((REPO / "Dockerfile").read_text())
    assert base == BaseImage(ref="docker.io/library/debian:bookworm-slim", suite="bookworm")


@pytest.mark.parametrize("text", [
    "FROM debian:bookworm\n",  # not slim: a different image than the one made here
    "FROM ubuntu:24.04\n",
    "FROM debian:bookworm-slim AS a\nFROM debian:bookworm-slim\n",
    "# FROM debian:bookworm-slim\n",
])
def test_a_base_that_cannot_be_made_locally_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        BaseImage.from_dockerfile(text)


def test_base_rootfs_is_minbase_slimmed_without_device_nodes(tmp_path: Path) -> None:
    argv = BaseImage("docker.io/library/debian:bookworm-slim", "bookworm").mmdebstrap_argv(tmp_path / "b.tar")
    assert argv[0] == "mmdebstrap" and "--variant=minbase" in argv and "--skip=output/dev" in argv
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in argv
    assert argv[-3:] == ["bookworm", str(tmp_path / "b.tar"), "http://deb.debian.org/debian"]


def test_base_sources_are_the_slim_images_deb822_set() -> None:
    text = BaseImage("r", "bookworm").sources()
    assert "Suites: bookworm bookworm-updates\n" in text and "Suites: bookworm-security\n" in text
    assert text.count("Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg") == 2


def test_base_recipe_changes_with_the_suite() -> None:
    assert BaseImage("r", "bookworm").recipe() != BaseImage("r", "trixie").recipe()
    assert BaseImage("r", "bookworm").recipe() == BaseImage("r", "bookworm").recipe()


def test_build_keeps_the_dockerfile_shell_and_never_pulls(tmp_path: Path) -> None:
    b = Buildah(tmp_path / "s", tmp_path / "r", "overlay")
    argv = b.bud_argv(REPO / "Dockerfile", REPO, "ghcr.io/zvolt/zvolt:0.1.0", tmp_path / "home")
    assert argv[:7] == ["buildah", "--root", str(tmp_path / "s"), "--runroot", str(tmp_path / "r"),
                        "--storage-driver", "overlay"]
    assert argv[7] == "bud"
    # --format oci would silently drop SHELL ["/bin/sh", "-eu", "-c"]: failing RUN lines pass.
    assert argv[argv.index("--format") + 1] == "docker"
    assert "--pull=never" in argv and "--layers" in argv
    assert argv[argv.index("--isolation") + 1] == "chroot"
    assert argv[argv.index("--volume") + 1] == f"{tmp_path / 'home'}:/root"
    assert argv[-1] == str(REPO)


def test_run_and_push_argv(tmp_path: Path) -> None:
    b = Buildah(tmp_path, tmp_path, "vfs")
    run = b.run_argv("c1", ["id", "-u"], user="0")
    assert run[run.index("run"):] == ["run", "--isolation", "chroot", "--user", "0", "c1", "--", "id", "-u"]
    assert "--user" not in b.run_argv("c1", ["id"])
    push = b.push_argv("ghcr.io/zvolt/zvolt:0.1.0", tmp_path / "layout")
    # A layout directory: a second name pushed there is added, an oci-archive would be replaced.
    assert push[-1] == f"oci:{tmp_path / 'layout'}:ghcr.io/zvolt/zvolt:0.1.0"


def test_run_argv_mounts_and_sets_env_before_the_container(tmp_path: Path) -> None:
    b = Buildah(tmp_path, tmp_path, "vfs")
    run = b.run_argv("c1", ["sh"], volumes=[(tmp_path / "v", "/data")], env=[("PORT", "5433")])
    assert run[run.index("run"):] == ["run", "--isolation", "chroot", "--volume", f"{tmp_path / 'v'}:/data",
                                      "--env", "PORT=5433", "c1", "--", "sh"]


def test_build_without_a_home_mounts_nothing_over_root(tmp_path: Path) -> None:
    argv = Buildah(tmp_path, tmp_path, "vfs").bud_argv(REPO / "Dockerfile", REPO, "localhost/x:1", None)
    assert "--volume" not in argv


def test_layout_archive_has_the_layout_at_its_root_in_a_fixed_form(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    (layout / "blobs/sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text("{}")
    (layout / "blobs/sha256/ab").write_bytes(b"x")
    write_layout_archive(layout, tmp_path / "a.tar")
    first = (tmp_path / "a.tar").read_bytes()
    os.utime(layout / "index.json", (1, 1))
    write_layout_archive(layout, tmp_path / "b.tar")
    assert (tmp_path / "b.tar").read_bytes() == first  # mtimes and owners do not leak in
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == ["blobs/sha256/ab", "index.json", "oci-layout"]
        assert {(m.uid, m.mtime) for m in tar.getmembers()} == {(0, 0)}


FILESYSTEMS = "nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\toverlay\n"


def test_storage_driver_is_overlay_on_a_plain_filesystem(tmp_path: Path) -> None:
    mounts = "/dev/vda / ext4 rw 0 0\nproc /proc proc rw 0 0\n"
    assert storage_driver(tmp_path / "storage", mounts, FILESYSTEMS) == "overlay"


def test_storage_driver_is_vfs_on_overlayfs_or_without_overlay(tmp_path: Path) -> None:
    on_overlay = f"/dev/vda / ext4 rw 0 0\noverlay {tmp_path} overlay rw 0 0\n"
    assert storage_driver(tmp_path / "storage", on_overlay, FILESYSTEMS) == "vfs"
    no_overlay = FILESYSTEMS.replace("nodev\toverlay\n", "")
    assert storage_driver(tmp_path / "storage", "/dev/vda / ext4 rw 0 0\n", no_overlay) == "vfs"


def test_an_existing_store_keeps_its_driver(tmp_path: Path) -> None:
    (tmp_path / "storage/vfs-images").mkdir(parents=True)
    assert storage_driver(tmp_path / "storage", "/dev/vda / ext4 rw 0 0\n", FILESYSTEMS) == "vfs"


def test_default_tag_is_what_the_chart_runs() -> None:
    app_version = re.search(r'^appVersion: "([^"]+)"', (REPO / "charts/zvolt/Chart.yaml").read_text(), re.M)
    assert app_version
    assert chart_image_ref(REPO) == f"ghcr.io/zvolt/zvolt:{app_version.group(1)}"


def test_cache_is_outside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZVOLT_IMAGE_CACHE", raising=False)
    root = ImageCache.from_env().root
    assert root.name == "zvolt-image" and REPO not in root.parents


@pytest.mark.parametrize("ref", ["ghcr.io/zvolt/zvolt:0.1.0", "localhost/zvolt:dev", "localhost:5000/a/b-c:v1.2_3"])
def test_image_names_docker_accepts(ref: str) -> None:
    assert check_ref(ref) == ref


@pytest.mark.parametrize("ref", ["--root=/tmp:x", "zvolt", "Zvolt/zvolt:1", "a b:1", "ghcr.io/zvolt/zvolt:", "x:-y"])
def test_image_names_that_would_reach_argv_unchecked_are_refused(ref: str) -> None:
    with pytest.raises(ValueError):
        check_ref(ref)
