"""The images a lab kubelet runs besides zvolt's own, made here because no registry is
reachable: the pod sandbox (pause, from the project's lab/pause/pause.c), the kubernetes-csi
sidecars the chart runs (each an existing static binary from $ZVOLT_K8S_BIN, FROM scratch) and
PostgreSQL 15 from Debian packages (lab/images/postgres). Each becomes one OCI archive for
`ctr -n k8s.io images import`; node-images.json lists them with the helm values that make the
chart run them."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import yaml

from lab import k8sbin
from lab.oci_image import (
    BaseImage,
    Buildah,
    ImageCache,
    ImageInfo,
    check_ref,
    ensure_host_packages,
    export_archive,
    inspect_image,
    make_base,
    quiet,
)
from lab.steps import Steps, clean_env

# kubelet v1.32's default --pod-infra-container-image and the sandbox_image of Debian
# bookworm's containerd 1.6: whichever the node's runtime asks for is there.
PAUSE_REFS = ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.6")
PAUSE_USER = "65535:65535"  # the upstream pause image's user
PAUSE_SOURCE = Path("lab/pause/pause.c")
POSTGRES_REF = "localhost/zvolt-lab/postgres:15"
POSTGRES_DOCKERFILE = Path("lab/images/postgres/Dockerfile")
RECIPE_LABEL = "io.zvolt.recipe"
GCC = ("gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")
HOST_PACKAGES = ("gcc", "libc6-dev")
_VERSION = re.compile(r"\bv\d+\.\d+\.\d+(?:-[0-9A-Za-z.]+)?\b")
_PT_INTERP = 3


@dataclass(frozen=True)
class Sidecar:
    """A kubernetes-csi sidecar the chart runs: `sidecars.<key>` in values.yaml."""

    key: str
    repository: str
    chart_tag: str

    @property
    def binary(self) -> str:
        # The release images are named for the one binary they hold.
        return self.repository.rsplit("/", 1)[-1]


def chart_sidecars(root: Path) -> list[Sidecar]:
    values = yaml.safe_load((root / "charts/zvolt/values.yaml").read_text())
    return [Sidecar(key, str(v["repository"]), str(v["tag"]))
            for key, v in values["sidecars"].items() if isinstance(v, dict) and "repository" in v]


def is_static_elf(data: bytes) -> bool:
    """An x86-64 ELF executable without a program interpreter: it runs in an empty image
    (a dynamic one would fail there with a bare 'no such file or directory')."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        return False
    (e_type,) = struct.unpack_from("<H", data, 0x10)
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    if e_type not in (2, 3) or phoff + phnum * phentsize > len(data):
        return False
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != _PT_INTERP for i in range(phnum))


def binary_version(binary: Path) -> str:
    """What the binary says it is (`--version`); for one without that flag (livenessprobe),
    the row VERSIONS.txt beside it gives."""
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False)
    found = _VERSION.findall(proc.stdout + proc.stderr) if proc.returncode == 0 else []
    if found:
        return str(found[-1])
    listing = binary.parent / "VERSIONS.txt"
    if listing.is_file():
        for line in listing.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == binary.name and _VERSION.fullmatch(fields[1]):
                return fields[1]
    raise ValueError(f"{binary} has no --version and {listing} lists no version for it: "
                     f"add a line '{binary.name} vX.Y.Z' there")


@dataclass(frozen=True)
class ScratchImage:
    """One static binary as the whole image, and its entry point."""

    refs: tuple[str, ...]
    binary: Path
    user: str | None = None

    @property
    def entrypoint(self) -> str:
        return "/" + self.binary.name

    def config_args(self, recipe: str) -> list[str]:
        return ["--os", "linux", "--arch", "amd64", "--entrypoint", json.dumps([self.entrypoint]),
                *(["--user", self.user] if self.user else []), "--label", f"{RECIPE_LABEL}={recipe}"]


@dataclass(frozen=True)
class NodeImage:
    name: str
    refs: list[str]
    image_id: str
    size: int  # unpacked
    archive: str
    archive_size: int
    seconds: float
    # `helm --set` values that make the chart run this image instead of its own pin.
    helm_set: dict[str, str]


@dataclass(frozen=True)
class NodeImages:
    images: list[NodeImage]
    skipped: list[str]  # one line each: what was not built and why
    manifest: Path


def scratch_image(steps: Steps, buildah: Buildah, image: ScratchImage) -> ImageInfo:
    """Commit (or find, when its recipe is unchanged) the image under every ref."""
    data = image.binary.read_bytes()
    if not is_static_elf(data):
        raise ValueError(f"{image.binary} is not a static executable, so it cannot run in an image FROM scratch")
    recipe = hashlib.sha256(data + json.dumps(image.config_args("")).encode()).hexdigest()[:16]
    known = [inspect_image(buildah, ref) for ref in image.refs]
    ids = {k.image_id for k in known if k is not None and k.labels.get(RECIPE_LABEL) == recipe}
    if len(ids) == 1 and known[0] is not None and None not in known:
        steps.note(f"image {image.refs[0]}", f"cached (recipe {recipe})")
        return known[0]
    with steps.step(f"image {image.refs[0]} FROM scratch"):
        container = steps.capture(buildah.argv("from", "--pull=never", "scratch")).strip()
        try:
            steps.run(buildah.argv("copy", "--chmod", "0755", container, str(image.binary), image.entrypoint))
            steps.run(buildah.argv("config", *image.config_args(recipe), container))
            steps.run(buildah.argv("commit", "--quiet", "--rm", container, image.refs[0]))
        finally:
            quiet(buildah.argv("rm", container))
        if len(image.refs) > 1:
            steps.run(buildah.argv("tag", image.refs[0], *image.refs[1:]))
    info = inspect_image(buildah, image.refs[0])
    if info is None:
        raise RuntimeError(f"buildah committed {image.refs[0]} but its store does not hold it")
    return info


def compile_pause(steps: Steps, source: Path, out_dir: Path) -> Path:
    """gcc on the host: the program is deterministic, so an unchanged source gives the same
    bytes and the image stays cached."""
    with steps.step("compile pause (gcc -static)"):
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / "pause.partial"
        steps.run([*GCC, "-o", str(partial), str(source / PAUSE_SOURCE)], env=clean_env(), timeout=300)
        binary = out_dir / "pause"
        partial.rename(binary)
    return binary


def postgres_image(steps: Steps, cache: ImageCache, buildah: Buildah, source: Path, *,
                   refresh_base: bool) -> ImageInfo:
    dockerfile = source / POSTGRES_DOCKERFILE
    make_base(steps, cache, buildah, BaseImage.from_dockerfile(dockerfile.read_text()), refresh=refresh_base)
    with steps.step(f"buildah bud {POSTGRES_REF} ({buildah.driver})"):
        steps.run(buildah.bud_argv(dockerfile, dockerfile.parent, POSTGRES_REF, None), env=clean_env(), timeout=3600)
    info = inspect_image(buildah, POSTGRES_REF)
    if info is None:
        raise RuntimeError(f"buildah reported success but {POSTGRES_REF} is not in {cache.storage}")
    return info


def build(cache: ImageCache, source: Path, out: TextIO, *, driver: str | None = None,
          refresh_base: bool = False) -> NodeImages:
    """pause, every chart sidecar whose binary is in $ZVOLT_K8S_BIN, postgres: built (or found
    cached), each exported to <cache>/node-images/<name>.tar, listed in node-images.json."""
    steps = Steps(cache.logs, out)
    ensure_host_packages(steps, HOST_PACKAGES)
    buildah = Buildah.for_cache(cache, driver)
    images: list[NodeImage] = []
    skipped: list[str] = []

    def finish(name: str, refs: list[str], info: ImageInfo, t0: float, helm_set: dict[str, str]) -> None:
        archive = cache.node_images / f"{name}.tar"
        export_archive(steps, buildah, refs, info.image_id, archive)
        images.append(NodeImage(name=name, refs=refs, image_id=info.image_id, size=info.size, archive=str(archive),
                                archive_size=archive.stat().st_size, seconds=round(time.monotonic() - t0, 1),
                                helm_set=helm_set))

    t0 = time.monotonic()
    pause = compile_pause(steps, source, cache.node_images / "bin")
    finish("pause", list(PAUSE_REFS), scratch_image(steps, buildah, ScratchImage(PAUSE_REFS, pause, PAUSE_USER)),
           t0, {})
    for sidecar in chart_sidecars(source):
        t0 = time.monotonic()
        binary = k8sbin.k8s_bin(sidecar.binary)
        if binary is None:
            skipped.append(k8sbin.missing(sidecar.binary))
            steps.note(f"image {sidecar.repository}", f"skipped: {sidecar.binary} not in {k8sbin.k8s_bin_dir()}")
            continue
        version = binary_version(binary)
        ref = check_ref(f"{sidecar.repository}:{version}")
        info = scratch_image(steps, buildah, ScratchImage((ref,), binary))
        helm_set = {} if version == sidecar.chart_tag else {f"sidecars.{sidecar.key}.tag": version}
        finish(sidecar.binary, [ref], info, t0, helm_set)
    t0 = time.monotonic()
    finish("postgres", [POSTGRES_REF], postgres_image(steps, cache, buildah, source, refresh_base=refresh_base), t0, {})
    # A changed recipe leaves the image it replaced behind, untagged.
    with steps.step("prune images of earlier builds"):
        steps.run(buildah.argv("rmi", "--prune"))
    manifest = cache.node_images / "node-images.json"
    manifest.write_text(json.dumps({"images": [asdict(i) for i in images], "skipped": skipped}, indent=1) + "\n")
    return NodeImages(images=images, skipped=skipped, manifest=manifest)
