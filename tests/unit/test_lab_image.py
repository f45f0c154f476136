"""Image recipe helpers: cache keys, version parsing, argv, the build lock."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from lab import aptversions, image
from lab.aptversions import Versions

V = Versions(kernel="6.12.95+deb12-amd64", kernel_pkg="6.12.95-1~bpo12+1", zfs="2.3.2-2~bpo12+2")


def test_image_key_changes_with_every_input() -> None:
    base = image.image_key(V, ["grpcio==1"], "r1", "ssh-ed25519 AAA")
    assert base == image.image_key(V, ["grpcio==1"], "r1", "ssh-ed25519 AAA")
    others = {
        image.image_key(Versions("6.12.96+deb12-amd64", V.kernel_pkg, V.zfs), ["grpcio==1"], "r1", "ssh-ed25519 AAA"),
        image.image_key(Versions(V.kernel, V.kernel_pkg, "2.3.3-1"), ["grpcio==1"], "r1", "ssh-ed25519 AAA"),
        image.image_key(V, ["grpcio==2"], "r1", "ssh-ed25519 AAA"),
        image.image_key(V, ["grpcio==1"], "r2", "ssh-ed25519 AAA"),
        image.image_key(V, ["grpcio==1"], "r1", "ssh-ed25519 BBB"),
    }
    assert base not in others and len(others) == 5
    assert base.startswith("6.12.95-deb12-amd64_zfs-2.3.2-2-bpo12-2_")
    assert "/" not in base and "~" not in base


def test_module_key_is_kernel_plus_zfs_only() -> None:
    assert image.module_key(V) == "6.12.95-deb12-amd64_zfs-2.3.2-2-bpo12-2"


def test_recipe_digest_tracks_the_recipe_files() -> None:
    d = image.recipe_digest()
    assert len(d) == 64 and d == image.recipe_digest()


def test_runtime_deps_come_from_pyproject(tmp_path: Path) -> None:
    p = tmp_path / "pyproject.toml"
    p.write_text('[project]\nname="x"\ndependencies=["protobuf==7", "grpcio==1.85.1"]\n')
    assert image.runtime_deps(p) == ["grpcio==1.85.1", "protobuf==7"]


def test_wheels_are_downloaded_for_the_guest_python(tmp_path: Path) -> None:
    argv = image.pip_download_argv("/py", tmp_path, ["grpcio==1.85.1"])
    assert argv[:4] == ["/py", "-m", "pip", "download"]
    assert "--only-binary=:all:" in argv
    assert argv[argv.index("--python-version") + 1] == "3.11"
    assert argv[argv.index("--implementation") + 1] == "cp"
    assert "manylinux2014_x86_64" in argv and argv[-1] == "grpcio==1.85.1"


def test_debootstrap_is_minbase_bookworm(tmp_path: Path) -> None:
    argv = image.debootstrap_argv(tmp_path / "root")
    assert argv[0] == "debootstrap" and "--variant=minbase" in argv
    assert argv[-3:] == ["bookworm", str(tmp_path / "root"), aptversions.MIRROR]


MADISON = """\
linux-image-amd64 | 6.12.95-1~bpo12+1 | http://deb.debian.org/debian bookworm-backports/main amd64 Packages
linux-image-amd64 | 6.1.140-1 | http://deb.debian.org/debian bookworm/main amd64 Packages
"""


def test_backports_version_is_picked_from_madison() -> None:
    assert aptversions.backports_version(MADISON, "linux-image-amd64") == "6.12.95-1~bpo12+1"
    with pytest.raises(RuntimeError):
        aptversions.backports_version(MADISON.splitlines()[1], "linux-image-amd64")


def test_kernel_release_from_the_metapackage_dependency() -> None:
    show = "Package: linux-image-amd64\nDepends: linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)\n"
    assert aptversions.kernel_release(show) == "6.12.95+deb12-amd64"
    with pytest.raises(RuntimeError):
        aptversions.kernel_release("Depends: foo\n")


def test_sources_cover_backports_and_contrib() -> None:
    src = aptversions.sources_list()
    assert "bookworm-backports main contrib" in src and "bookworm-security main contrib" in src
    assert "bookworm-updates main contrib" in src


def test_build_lock_is_exclusive(tmp_path: Path) -> None:
    lock = tmp_path / "build.lock"
    with image.locked(lock), lock.open("a") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with lock.open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_backports_packages_are_pinned_to_the_keyed_versions() -> None:
    got = image.pinned(["linux-image-amd64", "zfsutils-linux", "python3-pyzfs", "fio"], V)
    assert got == [
        "linux-image-amd64=6.12.95-1~bpo12+1", "zfsutils-linux=2.3.2-2~bpo12+2", "python3-pyzfs=2.3.2-2~bpo12+2", "fio",
    ]
