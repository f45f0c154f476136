"""`zvolt-lab build`: the guest image from Debian packages, cached by kernel + ZFS + recipe.

Steps: host packages → versions (private apt lists) → ssh key → wheels → debootstrap →
packages in a chroot → ZFS module by DKMS (or from the module tarball cache) → guest config
→ ext4 image. A finished image is cached, so a warm build only resolves versions and checks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lab import aptversions, hostpkgs, recipe
from lab.aptversions import Versions
from lab.paths import Cache, source_root
from lab.steps import StepFailed, Steps, clean_env

WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
GUEST_PYTHON = "3.11"


@dataclass(frozen=True)
class Image:
    dir: Path
    key: str
    versions: Versions

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.img"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @classmethod
    def load(cls, path: Path) -> Image:
        meta = json.loads((path / "meta.json").read_text())
        return cls(dir=path.resolve(), key=meta["key"], versions=Versions(**meta["versions"]))


def runtime_deps(pyproject: Path) -> list[str]:
    data = tomllib.loads(pyproject.read_text())
    return sorted(str(d) for d in data["project"]["dependencies"])


def recipe_digest() -> str:
    """Hash of the code that decides what the image contains."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ("recipe.py", "image.py", "aptversions.py"):
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()


def image_key(versions: Versions, deps: Sequence[str], recipe_hash: str, pubkey: str) -> str:
    h = hashlib.sha256()
    for part in (versions.kernel, versions.kernel_pkg, versions.zfs, *deps, recipe_hash, pubkey.strip()):
        h.update(part.encode() + b"\0")
    return f"{versions.kernel}_zfs-{versions.zfs}_{h.hexdigest()[:16]}".replace("~", "-").replace("+", "-")


def module_key(versions: Versions) -> str:
    return f"{versions.kernel}_zfs-{versions.zfs}".replace("~", "-").replace("+", "-")


def wheels_key(deps: Sequence[str]) -> str:
    h = hashlib.sha256("\0".join([*deps, *WHEEL_PLATFORMS, GUEST_PYTHON]).encode())
    return h.hexdigest()[:16]


def pip_download_argv(python: str, dest: Path, deps: Sequence[str]) -> list[str]:
    argv = [python, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(dest)]
    for plat in WHEEL_PLATFORMS:
        argv += ["--platform", plat]
    return [*argv, "--python-version", GUEST_PYTHON, "--implementation", "cp", *deps]


def pinned(packages: Sequence[str], versions: Versions) -> list[str]:
    """The exact versions the cache key names, so the key cannot lie if backports moves on."""
    pins = {
        "linux-image-amd64": versions.kernel_pkg,
        "zfsutils-linux": versions.zfs,
        "python3-pyzfs": versions.zfs,
    }
    return [f"{p}={pins[p]}" if p in pins else p for p in packages]


def debootstrap_argv(root: Path) -> list[str]:
    return [
        "debootstrap", "--variant=minbase", f"--include={','.join(recipe.BOOTSTRAP_INCLUDE)}",
        aptversions.SUITE, str(root), aptversions.MIRROR,
    ]


def mkfs_argv(root: Path, image: Path) -> list[str]:
    return ["mkfs.ext4", "-q", "-F", "-L", "zvolt-root", "-d", str(root), str(image), recipe.IMAGE_SIZE]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One build at a time per cache (a second waits rather than corrupt the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"zvolt-lab: another build holds {path}; waiting", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_ssh_key(cache: Cache) -> str:
    key = cache.ssh_key
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "zvolt-lab", "-f", str(key)],
            check=True, stdin=subprocess.DEVNULL,
        )
    return Path(f"{key}.pub").read_text()


class Chroot:
    """The build chroot: the only place that mounts into it and runs commands inside it."""

    BINDS = ("proc", "sys", "dev", "dev/pts")

    def __init__(self, root: Path, steps: Steps, debs: Path) -> None:
        self.root = root
        self.steps = steps
        self.debs = debs
        self.mounted: list[Path] = []

    def __enter__(self) -> Chroot:
        try:
            for rel in self.BINDS:
                self._bind(Path("/") / rel, self.root / rel)
            (self.debs / "partial").mkdir(parents=True, exist_ok=True)
            self._bind(self.debs, self.root / "var/cache/apt/archives")
        except BaseException:
            self.close()
            raise
        return self

    def _bind(self, src: Path, dst: Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
        self.mounted.append(dst)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for dst in reversed(self.mounted):
            if subprocess.run(["umount", str(dst)], check=False, capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(dst)], check=False, capture_output=True)
        self.mounted.clear()

    def run(self, *argv: str, timeout: float = 1800) -> None:
        self.steps.run(["chroot", str(self.root), *argv], env=clean_env(), timeout=timeout)

    def capture(self, *argv: str) -> str:
        return self.steps.capture(["chroot", str(self.root), *argv], env=clean_env())

    def apt_install(self, packages: Sequence[str], *, target: str | None = None, timeout: float = 1800) -> None:
        argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
        if target:
            argv += ["-t", target]
        self.run(*argv, *packages, timeout=timeout)

    def write(self, path: str, content: str, mode: int = 0o644) -> None:
        dst = self.root / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(content)
        dst.chmod(mode)


def write_recipe_files(ch: Chroot) -> None:
    for path, content in recipe.FILES.items():
        ch.write(path, content, 0o755 if path.endswith("policy-rc.d") else 0o644)
    ch.write("/etc/apt/sources.list", aptversions.sources_list(keyring=None))


def zfs_module(ch: Chroot, cache: Cache, versions: Versions, steps: Steps) -> None:
    tarball = cache.modules / f"{module_key(versions)}.tar.zst"
    kver = versions.kernel
    moddir = f"lib/modules/{kver}"
    if not tarball.exists():
        with steps.step("zfs module (DKMS, slow)"):
            ch.apt_install([f"linux-headers-{kver}", f"zfs-dkms={versions.zfs}"], target=aptversions.BACKPORTS,
                           timeout=3600)
            built = list((ch.root / moddir).rglob("zfs.ko*"))
            if not built:
                ch.run("dkms", "autoinstall", "-k", kver, timeout=3600)
                built = list((ch.root / moddir).rglob("zfs.ko*"))
            if not built:
                raise RuntimeError(f"DKMS built no zfs.ko for {kver}")
            rel = built[0].relative_to(ch.root / moddir).parts[0]  # "updates"
            cache.modules.mkdir(parents=True, exist_ok=True)
            tmp = tarball.with_suffix(".tmp")
            steps.run(["tar", "--zstd", "-C", str(ch.root / moddir), "-cf", str(tmp), rel])
            tmp.rename(tarball)
        with steps.step("purge build tools"):
            ch.run("apt-get", "purge", "-y", "-q", "zfs-dkms", "dkms", f"linux-headers-{kver}")
            ch.run("apt-get", "autoremove", "--purge", "-y", "-q")
    else:
        steps.note("zfs module (DKMS, slow)", f"cached {tarball.name}")
    with steps.step("zfs module install"):
        steps.run(["tar", "--zstd", "-C", str(ch.root / moddir), "-xf", str(tarball)])
        ch.run("depmod", "-a", kver)
        if not list((ch.root / moddir).rglob("zfs.ko*")):
            raise RuntimeError("zfs.ko missing after restoring the module tarball")


def configure(ch: Chroot, pubkey: str, wheels: Path, deps: Sequence[str]) -> None:
    ch.write("/root/.ssh/authorized_keys", pubkey, 0o600)
    (ch.root / "root/.ssh").chmod(0o700)
    (ch.root / "src").mkdir(exist_ok=True)
    ch.run("systemctl", "enable", *recipe.ENABLED_UNITS)
    ch.run("systemctl", "disable", *recipe.DISABLED_UNITS)
    ch.run("systemctl", "mask", *recipe.MASKED_UNITS)
    ch.run("passwd", "-d", "root")  # console login on the serial port for debugging
    stage = ch.root / "tmp/wheels"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(wheels, stage)
    ch.run("python3", "-m", "venv", "--system-site-packages", recipe.VENV)
    ch.run(f"{recipe.VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheels", *deps)
    shutil.rmtree(stage)
    site = ch.capture(f"{recipe.VENV}/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    ch.write(f"{site.strip()}/zvolt-src.pth", "/src\n")
    ch.run(f"{recipe.VENV}/bin/python", "-c", "import grpc, google.protobuf, prometheus_client, libzfs_core")
    for d in ("var/lib/apt/lists",):
        for p in (ch.root / d).glob("*"):
            if p.is_file():
                p.unlink()


def build(cache: Cache | None = None, *, out: object = None, force: bool = False) -> Image:
    cache = cache or Cache.from_env()
    cache.root.mkdir(parents=True, exist_ok=True)
    steps = Steps(cache.logs, out=sys.stdout if out is None else out)  # type: ignore[arg-type]
    with locked(cache.lock):
        hostpkgs.ensure(steps)
        versions = aptversions.resolve(steps, cache.apt)
        pubkey = ensure_ssh_key(cache)
        deps = runtime_deps(source_root() / "pyproject.toml")
        key = image_key(versions, deps, recipe_digest(), pubkey)
        final = cache.images / key
        if (final / "meta.json").exists() and not force:
            steps.note("image", f"cached {final}")
            _point_current(cache, final)
            return Image.load(final)

        wheels = cache.wheels / wheels_key(deps)
        if not (wheels / ".complete").exists():
            with steps.step("wheels (pip download)"):
                shutil.rmtree(wheels, ignore_errors=True)
                wheels.mkdir(parents=True)
                steps.run(pip_download_argv(sys.executable, wheels, deps), env={**os.environ, "PIP_NO_INPUT": "1"})
                (wheels / ".complete").touch()
        else:
            steps.note("wheels (pip download)", "cached")

        work = cache.work / key
        root = work / "rootfs"
        _clean_work(work)
        work.mkdir(parents=True)
        try:
            with steps.step("debootstrap"):
                steps.run(debootstrap_argv(root), env=clean_env(), timeout=1800)
            write_recipe_files(Chroot(root, steps, cache.debs))
            with Chroot(root, steps, cache.debs) as ch:
                with steps.step("base packages"):
                    ch.run("apt-get", "update", "-q", timeout=600)
                    ch.apt_install(recipe.BASE_PACKAGES)
                with steps.step("kernel + zfs + nvme (backports)"):
                    ch.apt_install(pinned(recipe.BACKPORTS_PACKAGES, versions), target=aptversions.BACKPORTS)
                    if not (root / f"boot/vmlinuz-{versions.kernel}").exists():
                        raise RuntimeError(f"kernel {versions.kernel} was not installed (versions moved? rebuild)")
                zfs_module(ch, cache, versions, steps)
                with steps.step("guest config + venv"):
                    configure(ch, pubkey, wheels, deps)
            with steps.step("image"):
                staging = work / "image"
                staging.mkdir()
                shutil.copy2(root / f"boot/vmlinuz-{versions.kernel}", staging / "vmlinuz")
                shutil.copy2(root / f"boot/initrd.img-{versions.kernel}", staging / "initrd.img")
                steps.run(mkfs_argv(root, staging / "rootfs.img"), timeout=1200)
                meta = {"key": key, "versions": asdict(versions), "deps": deps}
                (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
                shutil.rmtree(final, ignore_errors=True)
                final.parent.mkdir(parents=True, exist_ok=True)
                staging.rename(final)
                _point_current(cache, final)
        finally:
            _clean_work(work)
        return Image.load(final)


def _clean_work(work: Path) -> None:
    # A crashed build may have left bind mounts: never rm -r through them.
    root = work / "rootfs"
    for rel in ("var/cache/apt/archives", "dev/pts", "dev", "sys", "proc"):
        p = root / rel
        if p.is_dir() and os.path.ismount(p):
            subprocess.run(["umount", "-l", str(p)], check=False, capture_output=True)
    if any(os.path.ismount(root / rel) for rel in ("proc", "sys", "dev", "dev/pts", "var/cache/apt/archives")):
        raise StepFailed("cleanup", work / "cleanup.log", f"{root} still has mounts; not removing it")
    shutil.rmtree(work, ignore_errors=True)


def _point_current(cache: Cache, final: Path) -> None:
    tmp = cache.images / ".current.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(final.name)
    tmp.replace(cache.current)


def current_image(cache: Cache) -> Image | None:
    if (cache.current / "meta.json").exists():
        return Image.load(cache.current)
    return None
