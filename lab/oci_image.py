"""The zvolt container image: the project's Dockerfile built with buildah (no daemon, no
registry), on a Debian base image made here from Debian packages, exported as an OCI archive
that `ctr images import` (containerd) or `podman load` takes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from lab.hostpkgs import apt_install_argv, missing
from lab.steps import Steps, clean_env

HOST_PACKAGES = ("buildah", "mmdebstrap")
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
BASE_LABEL = "io.zvolt.base-recipe"
# The build runs as root with HOME=/root; this host's trust store (which may hold a
# TLS-inspecting proxy's CA) reaches pip through a pip.conf in a home directory mounted over
# /root for the build only, so neither the CA nor anything the build writes to $HOME ends up
# in a layer, and the Dockerfile stays the one users build with Docker.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# What debian:*-slim drops from every package (debuerreotype's slimming); the dpkg config
# stays in the base, so the Dockerfile's own installs are slimmed the same way.
SLIM_DPKG = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/lintian/overrides/*",
    "path-exclude=/usr/share/locale/*",
)
# Debian's own images run bash with this PATH.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SLIM_FROM = re.compile(r"^(?:(?:docker\.io/)?(?:library/)?)debian:([a-z]+)-slim$")
# registry/path:tag as Docker's reference grammar allows (lower-case path, explicit tag).
_COMPONENT = r"[a-z0-9]+(?:[._-][a-z0-9]+)*"
_REF = re.compile(rf"^{_COMPONENT}(?::[0-9]+)?(?:/{_COMPONENT})*:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}$")


@dataclass(frozen=True)
class ImageCache:
    """Everything the build keeps between runs; never inside the repository."""

    root: Path

    @classmethod
    def from_env(cls) -> ImageCache:
        env = os.environ.get("ZVOLT_IMAGE_CACHE")
        return cls(Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "zvolt-image")

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def runroot(self) -> Path:
        # Mount and lock state must not outlive a reboot: tmpfs, one per store.
        return Path("/run/zvolt-image") / hashlib.sha256(str(self.root).encode()).hexdigest()[:12]

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def home(self) -> Path:
        return self.root / "build-home"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def archive(self) -> Path:
        return self.root / "zvolt-oci.tar"

    @property
    def node_images(self) -> Path:
        """pause, sidecar and postgres archives (lab/node_images.py) and their manifest."""
        return self.root / "node-images"


@dataclass(frozen=True)
class BaseImage:
    """The Dockerfile's FROM, made locally: debian:<suite>-slim from mmdebstrap --variant=minbase."""

    ref: str
    suite: str

    @classmethod
    def from_dockerfile(cls, text: str) -> BaseImage:
        froms = [line.split()[1] for line in text.splitlines()
                 if line.strip().upper().startswith("FROM ") and len(line.split()) >= 2]
        if len(froms) != 1:
            raise ValueError(f"the Dockerfile must have exactly one FROM, found {froms}")
        m = _SLIM_FROM.match(froms[0])
        if not m:
            raise ValueError(f"FROM {froms[0]}: only debian:<codename>-slim can be made locally from Debian packages")
        return cls(ref=f"docker.io/library/debian:{m.group(1)}-slim", suite=m.group(1))

    def sources(self) -> str:
        """The apt sources debian:<suite>-slim ships (deb822, no legacy sources.list)."""
        stanza = ("Types: deb\nURIs: {uri}\nSuites: {suites}\nComponents: main\n"
                  "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        return (stanza.format(uri=MIRROR, suites=f"{self.suite} {self.suite}-updates") + "\n"
                + stanza.format(uri=SECURITY_MIRROR, suites=f"{self.suite}-security"))

    def mmdebstrap_argv(self, target: Path) -> list[str]:
        return [
            "mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
            *(f"--dpkgopt={opt}" for opt in SLIM_DPKG),
            # An image has no device nodes; the runtime provides /dev.
            "--skip=output/dev",
            self.suite, str(target), MIRROR,
        ]

    def recipe(self) -> str:
        """Changes whenever what the base is made from changes (then it is made again)."""
        text = json.dumps([self.mmdebstrap_argv(Path("TARGET")), self.sources(), BASE_PATH])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_ref(ref: str) -> str:
    if not _REF.fullmatch(ref):
        raise ValueError(f"image name {ref!r} is not valid: use registry/path:tag "
                         "(lower-case path, e.g. localhost/zvolt:dev)")
    return ref


def chart_image_ref(root: Path) -> str:
    """The image the Helm chart runs by default, so an imported archive needs no values."""
    values = yaml.safe_load((root / "charts/zvolt/values.yaml").read_text())
    chart = yaml.safe_load((root / "charts/zvolt/Chart.yaml").read_text())
    return f"{values['image']['repository']}:{chart['appVersion']}"


def storage_driver(path: Path, mounts: str, filesystems: str) -> str:
    """overlay where the kernel has it and the cache is not itself on overlayfs, else vfs
    (a full copy per layer: slow and large, but works anywhere). A store keeps its driver."""
    for driver in ("overlay", "vfs"):
        if (path / f"{driver}-images").is_dir():
            return driver
    if not any(line.split()[-1:] == ["overlay"] for line in filesystems.splitlines()):
        return "vfs"
    best, fstype = "", ""
    target = str(path.resolve())
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mnt = fields[1]
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, fields[2]
    return "vfs" if fstype == "overlay" else "overlay"


@dataclass(frozen=True)
class Buildah:
    """argv for buildah against the cache's own store, with chroot isolation (root, no
    user namespaces or OCI runtime needed)."""

    root: Path
    runroot: Path
    driver: str

    @classmethod
    def for_cache(cls, cache: ImageCache, driver: str | None = None) -> Buildah:
        if driver is None:
            driver = storage_driver(cache.storage, Path("/proc/self/mounts").read_text(),
                                    Path("/proc/filesystems").read_text())
        return cls(cache.storage, cache.runroot, driver)

    def argv(self, *args: str) -> list[str]:
        return ["buildah", "--root", str(self.root), "--runroot", str(self.runroot),
                "--storage-driver", self.driver, *args]

    def bud_argv(self, dockerfile: Path, context: Path, tag: str, home: Path | None) -> list[str]:
        return self.argv(
            "bud", "--pull=never", "--layers",
            # The docker format keeps the Dockerfile's SHELL (sh -eu): under --format oci
            # buildah drops it and a failing command in a RUN would not fail the step.
            "--format", "docker",
            "--isolation", "chroot",
            *(["--volume", f"{home}:/root"] if home else []),
            "--file", str(dockerfile), "--tag", tag, str(context),
        )

    def run_argv(self, container: str, command: Sequence[str], user: str | None = None,
                 volumes: Sequence[tuple[Path, str]] = (), env: Sequence[tuple[str, str]] = ()) -> list[str]:
        return self.argv("run", "--isolation", "chroot", *(["--user", user] if user else []),
                         *(arg for host, inside in volumes for arg in ("--volume", f"{host}:{inside}")),
                         *(arg for name, value in env for arg in ("--env", f"{name}={value}")),
                         container, "--", *command)

    def push_argv(self, tag: str, layout: Path) -> list[str]:
        # An OCI layout directory, not oci-archive: a second name pushed to an oci-archive
        # replaces the first, while a layout's index.json collects them (pause has two).
        return self.argv("push", "--quiet", tag, f"oci:{layout}:{tag}")


@dataclass(frozen=True)
class Built:
    tag: str
    image_id: str
    size: int
    layers: list[int]
    archive: Path
    archive_size: int
    build_seconds: float
    home_writes: list[str]


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    size: int  # the layers unpacked: what a node stores
    layers: list[int]
    labels: dict[str, str]


def inspect_image(buildah: Buildah, ref: str) -> ImageInfo | None:
    """What the store knows of ref, or None when it does not hold it."""
    proc = subprocess.run(buildah.argv("inspect", "--type", "image", ref), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    data = json.loads(proc.stdout)
    layers = [int(layer["size"]) for layer in json.loads(data["Manifest"])["layers"]]
    labels = data.get("OCIv1", {}).get("config", {}).get("Labels") or {}
    return ImageInfo(image_id=str(data["FromImageID"]), size=sum(layers), layers=layers,
                     labels={str(k): str(v) for k, v in labels.items()})


def quiet(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), capture_output=True, check=False)


def make_base(steps: Steps, cache: ImageCache, buildah: Buildah, base: BaseImage, *, refresh: bool) -> None:
    recipe = base.recipe()
    known = inspect_image(buildah, base.ref)
    if not refresh and known is not None and known.labels.get(BASE_LABEL) == recipe:
        steps.note(f"base {base.ref}", f"cached (recipe {recipe})")
        return
    tarball = cache.base / f"{base.suite}-{recipe}.tar"
    if refresh or not tarball.exists():
        with steps.step(f"base rootfs: mmdebstrap {base.suite} minbase"):
            cache.base.mkdir(parents=True, exist_ok=True)
            partial = tarball.with_suffix(".partial.tar")
            steps.run(base.mmdebstrap_argv(partial), env=clean_env(), timeout=1800)
            partial.rename(tarball)
    with steps.step(f"base image {base.ref}"):
        sources = cache.base / f"{base.suite}.sources"
        sources.write_text(base.sources())
        container = steps.capture(buildah.argv("from", "--pull=never", "scratch")).strip()
        try:
            steps.run(buildah.argv("add", container, str(tarball), "/"))
            steps.run(buildah.argv("copy", container, str(sources), "/etc/apt/sources.list.d/debian.sources"))
            steps.run(buildah.run_argv(container, ["rm", "-f", "/etc/apt/sources.list"]))
            steps.run(buildah.argv("config", "--os", "linux", "--arch", "amd64", "--env", f"PATH={BASE_PATH}",
                                   "--cmd", "bash", "--label", f"{BASE_LABEL}={recipe}", container))
            steps.run(buildah.argv("commit", "--quiet", "--rm", container, base.ref))
        finally:
            quiet(buildah.argv("rm", container))


def ensure_host_packages(steps: Steps, packages: Sequence[str]) -> None:
    if missing(packages):
        with steps.step("host packages: " + " ".join(packages)):
            for argv in apt_install_argv(missing(packages)):
                steps.run(argv, env=clean_env(), timeout=900)


def write_layout_archive(layout: Path, archive: Path) -> None:
    """Tar an OCI layout directory as `ctr images import` reads it: its files at the
    archive's root, in a fixed order with fixed owners and times."""
    with tarfile.open(archive, "w") as tar:
        for path in sorted(p for p in layout.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(layout).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)


def export_archive(steps: Steps, buildah: Buildah, refs: Sequence[str], image_id: str, archive: Path) -> None:
    """One OCI archive holding image_id under every name in refs (containerd imports each)."""
    # The archive records which image it holds: an unchanged image is not exported again.
    stamp = archive.with_name(archive.name + ".image-id")
    want = f"{' '.join(refs)} {image_id}"
    if archive.exists() and stamp.exists() and stamp.read_text() == want:
        steps.note(f"export OCI archive {archive}", "up to date")
        return
    with steps.step(f"export OCI archive {archive}"):
        archive.parent.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        layout = archive.with_name(archive.name + ".layout")
        partial = archive.with_name(archive.name + ".partial")
        shutil.rmtree(layout, ignore_errors=True)
        partial.unlink(missing_ok=True)
        try:
            for ref in refs:
                steps.run(buildah.push_argv(ref, layout), timeout=1800)
            write_layout_archive(layout, partial)
        finally:
            shutil.rmtree(layout, ignore_errors=True)
        partial.rename(archive)
        stamp.write_text(want)


def prepare_home(home: Path) -> set[str]:
    """A fresh $HOME for the build; returns what was put there (anything else was written by it)."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    home.chmod(0o700)
    if HOST_CA.exists():
        shutil.copy(HOST_CA, home / "host-ca.crt")
        conf = home / ".config/pip/pip.conf"
        conf.parent.mkdir(parents=True)
        conf.write_text("[global]\ncert = /root/host-ca.crt\n")
    return {p.relative_to(home).as_posix() for p in home.rglob("*")}


def build(cache: ImageCache, source: Path, out: TextIO, *, tag: str | None = None, archive: Path | None = None,
          driver: str | None = None, refresh_base: bool = False) -> Built:
    """Build (layer cache in the store) and export; every long step prints one progress line."""
    steps = Steps(cache.logs, out)
    ensure_host_packages(steps, HOST_PACKAGES)
    dockerfile = source / "Dockerfile"
    base = BaseImage.from_dockerfile(dockerfile.read_text())
    buildah = Buildah.for_cache(cache, driver)
    tag = check_ref(tag or chart_image_ref(source))
    archive = archive or cache.archive
    make_base(steps, cache, buildah, base, refresh=refresh_base)
    placed = prepare_home(cache.home)
    t0 = time.monotonic()
    with steps.step(f"buildah bud {tag} ({buildah.driver})"):
        steps.run(buildah.bud_argv(dockerfile, source, tag, cache.home), env=clean_env(), timeout=3600)
    seconds = time.monotonic() - t0
    # Each source change leaves the previous image chain behind (~150 MB); the chain the new
    # image stands on is not dangling, so the layer cache survives.
    with steps.step("prune images of earlier builds"):
        steps.run(buildah.argv("rmi", "--prune"))
    written = sorted({p.relative_to(cache.home).as_posix() for p in cache.home.rglob("*")} - placed)
    info = inspect_image(buildah, tag)
    if info is None:
        raise RuntimeError(f"buildah reported success but {tag} is not in {cache.storage}")
    export_archive(steps, buildah, [tag], info.image_id, archive)
    return Built(tag=tag, image_id=info.image_id, size=info.size, layers=info.layers, archive=archive,
                 archive_size=archive.stat().st_size, build_seconds=seconds, home_writes=written)
