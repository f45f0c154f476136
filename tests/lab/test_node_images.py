"""The images a lab kubelet runs besides zvolt's own (`zvolt-lab oci-image --all`), built for
real and run: pause as PID 1 of its own PID namespace (SIGTERM ends it with 0, orphans are
reaped), every sidecar's binary answering --help, PostgreSQL initdb'ing into an fsGroup-style
volume, answering pg_isready and SQL as the postgres user and keeping its data over a restart,
and every archive imported by a private containerd under the names the chart and kubelet use.

Needs root (buildah's chroot isolation, unshare, chroot) and the Debian mirror. Sidecars whose
binary is not in $ZVOLT_K8S_BIN are skipped in one line. Does not use the lab guest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab import k8sbin
from lab.node_images import PAUSE_REFS, POSTGRES_REF, NodeImage, NodeImages, chart_sidecars
from lab.oci_image import Buildah, ImageCache

REPO = Path(__file__).resolve().parents[2]
POSTGRES_UID = 999

pytestmark = [pytest.mark.lab]
Containers = tuple[Buildah, dict[str, str]]  # buildah, and the working container made per ref


@dataclass(frozen=True)
class Built:
    images: NodeImages
    buildah: Buildah

    def named(self, name: str) -> NodeImage:
        [image] = [i for i in self.images.images if i.name == name]
        return image

    def config(self, ref: str) -> dict[str, Any]:
        proc = subprocess.run(self.buildah.argv("inspect", "--type", "image", ref),
                              capture_output=True, text=True, check=True)
        config: dict[str, Any] = json.loads(proc.stdout)["OCIv1"]["config"]
        return config


@pytest.fixture(scope="module")
def built() -> Built:
    if os.geteuid() != 0:
        pytest.skip("building the images needs root (buildah with chroot isolation)")
    from lab import node_images

    cache = ImageCache.from_env()
    t0 = time.monotonic()
    images = node_images.build(cache, REPO, sys.stderr)
    print(f"\nnode images built in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return Built(images, Buildah.for_cache(cache))


@pytest.fixture
def container(built: Built) -> Iterator[Containers]:
    """Working containers made on demand by ref, removed afterwards."""
    made: dict[str, str] = {}
    yield built.buildah, made
    for name in made.values():
        subprocess.run(built.buildah.argv("rm", name), capture_output=True, check=False)


def _from(buildah: Buildah, made: dict[str, str], ref: str) -> str:
    if ref not in made:
        made[ref] = subprocess.run(buildah.argv("from", "--pull=never", ref),
                                   capture_output=True, text=True, check=True).stdout.strip()
    return made[ref]


def _rootfs(buildah: Buildah, made: dict[str, str], ref: str) -> Path:
    return Path(subprocess.run(buildah.argv("mount", _from(buildah, made, ref)),
                               capture_output=True, text=True, check=True).stdout.strip())


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _wait_for(what: str, check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not callable(check) or not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_pause_names_are_what_kubelet_and_containerd_ask_for() -> None:
    kubelet = k8sbin.k8s_bin("kubelet")
    if kubelet is None:
        pytest.skip(k8sbin.missing("kubelet"))
    usage = subprocess.run([str(kubelet), "--help"], capture_output=True, text=True, timeout=60, check=False).stdout
    [line] = [line for line in usage.splitlines() if "--pod-infra-container-image" in line]
    assert f'(default "{PAUSE_REFS[0]}")' in line
    if shutil.which("containerd"):
        config = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True,
                                timeout=60, check=True).stdout
        assert f'sandbox_image = "{PAUSE_REFS[1]}"' in config


def test_pause_is_a_pid_1_that_stops_on_sigterm_and_reaps_orphans(built: Built, container: Containers) -> None:
    buildah, made = container
    pause = built.named("pause")
    assert pause.refs == list(PAUSE_REFS)
    config = built.config(PAUSE_REFS[0])
    assert config["User"] == "65535:65535"
    entrypoint = config["Entrypoint"]
    rootfs = _rootfs(buildah, made, PAUSE_REFS[0])
    # FROM scratch with one static binary: nothing else in the image.
    assert sorted(p.relative_to(rootfs).as_posix() for p in rootfs.rglob("*")) == ["pause"]
    # As in a pod sandbox: PID 1 of a new PID namespace, where the kernel drops signals
    # that have no handler, as the image's user.
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "chroot",
                             f"--userspec={config['User']}", str(rootfs), *map(str, entrypoint)])
    pid = 0
    try:
        _wait_for("pause to start", lambda: bool(_children(proc.pid)))
        [pid] = _children(proc.pid)
        _wait_for("pause to exec", lambda: Path(f"/proc/{pid}/exe").resolve().name == "pause")
        status = Path(f"/proc/{pid}/status").read_text()
        assert "\nUid:\t65535\t" in status
        assert status.split("\nNSpid:\t")[1].split()[1] == "1", "pause must be PID 1 in its namespace"
        # An orphan inside the namespace is reparented to pause, which must reap it.
        subprocess.run(["nsenter", f"--target={pid}", "--pid", "--", "/bin/sh", "-c", "/bin/sleep 2 & exit 0"],
                       check=True, timeout=30)
        _wait_for("the orphan to be reparented to pause", lambda: bool(_children(pid)))
        _wait_for("pause to reap the orphan (a zombie stays its child otherwise)",
                  lambda: not _children(pid), timeout=15)
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        # unshare's --kill-child would not reach it: the uid change clears the death signal.
        if proc.poll() is None:
            if pid:
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def test_sidecar_images_hold_their_binary_and_answer_help(built: Built, container: Containers) -> None:
    buildah, made = container
    sidecars = chart_sidecars(REPO)
    present = {s.binary for s in sidecars} & {i.name for i in built.images.images}
    if not present:
        pytest.skip(f"no sidecar binary ({len(built.images.skipped)} absent): {built.images.skipped[0]}")
    for sidecar in sidecars:
        if sidecar.binary not in present:
            continue
        image = built.named(sidecar.binary)
        [ref] = image.refs
        # The chart runs exactly this image with the values the build printed.
        tag = image.helm_set.get(f"sidecars.{sidecar.key}.tag", sidecar.chart_tag)
        assert ref == f"{sidecar.repository}:{tag}"
        config = built.config(ref)
        assert config["Entrypoint"] == [f"/{sidecar.binary}"]
        rootfs = _rootfs(buildah, made, ref)
        assert sorted(p.relative_to(rootfs).as_posix() for p in rootfs.rglob("*")) == [sidecar.binary]
        name = _from(buildah, made, ref)
        proc = subprocess.run(buildah.run_argv(name, [f"/{sidecar.binary}", "--help"]),
                              capture_output=True, text=True, timeout=120, check=False)
        # Go's flag packages exit 2 after printing the usage for --help in some of these
        # releases; the usage text is the proof that the binary ran inside the image.
        assert proc.returncode in (0, 2) and "-csi-address" in proc.stdout + proc.stderr, (ref, proc.stderr[-1000:])
        proc = subprocess.run(buildah.run_argv(name, [f"/{sidecar.binary}", "--version"]),
                              capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode == 0:  # livenessprobe has no --version
            assert tag in proc.stdout, (ref, proc.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Starts the image's entrypoint in the background (its output to stderr), waits for it, runs
# SQL over the socket (local: trust), then stops it cleanly; stdout holds only the answers.
POSTGRES_CHECK = r"""
"$@" -c port="$PORT" >&2 &
for i in $(seq 120); do pg_isready --quiet -h 127.0.0.1 -p "$PORT" && break; sleep 0.5; done
pg_isready -h 127.0.0.1 -p "$PORT"
psql -X -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -Atc "$SQL"
echo "uid=$(id -u) pgdata=$(stat -c '%u:%a' "$PGDATA")"
pg_ctl stop -m fast -w >/dev/null
wait
"""


def test_postgres_initdbs_an_empty_volume_and_answers_as_postgres(
        built: Built, container: Containers) -> None:
    buildah, made = container
    image = built.named("postgres")
    config = built.config(POSTGRES_REF)
    assert config["User"] == f"{POSTGRES_UID}:{POSTGRES_UID}"
    entrypoint = config["Entrypoint"]
    env = dict(str(e).split("=", 1) for e in config["Env"])
    assert env["PGDATA"] == "/var/lib/postgresql/data/pgdata"
    mount = Path(tempfile.mkdtemp(prefix="zvpg", dir="/tmp"))
    try:
        # What kubelet makes of a fresh ext4 volume under fsGroup 999: root-owned, group-writable
        # setgid root with lost+found in it; the server's directory must be made inside.
        (mount / "lost+found").mkdir(mode=0o700)
        os.chown(mount, 0, POSTGRES_UID)
        mount.chmod(0o2775)
        name = _from(buildah, made, POSTGRES_REF)
        port = _free_port()

        def run(sql: str) -> subprocess.CompletedProcess[str]:
            # No --user: buildah run takes the image's user and Env, as a pod does.
            argv = buildah.run_argv(name, ["sh", "-euc", POSTGRES_CHECK, "check", *map(str, entrypoint)],
                                    volumes=[(mount, "/var/lib/postgresql/data")],
                                    env=[("PORT", str(port)), ("SQL", sql)])
            return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)

        t0 = time.monotonic()
        first = run("SELECT 1; SHOW listen_addresses; CREATE TABLE t AS SELECT 42 AS v; SELECT current_user")
        first_s = time.monotonic() - t0
        assert first.returncode == 0, first.stderr[-3000:]
        assert "Success. You can now start" in first.stderr, "an empty directory must be initialised"
        lines = first.stdout.splitlines()
        assert "accepting connections" in lines[0]
        assert lines[1:6] == ["1", "0.0.0.0", "SELECT 1", "postgres", f"uid={POSTGRES_UID} pgdata={POSTGRES_UID}:700"]
        assert sorted(p.name for p in mount.iterdir()) == ["lost+found", "pgdata"]
        # A second start finds the cluster: no initdb over existing data.
        second = run("SELECT v FROM t")
        assert second.returncode == 0, second.stderr[-3000:]
        assert "Success." not in second.stderr and second.stdout.splitlines()[1] == "42"
    finally:
        shutil.rmtree(mount, ignore_errors=True)
    print(f"\npostgres image {image.size / 1e6:.0f} MB, archive {image.archive_size / 1e6:.0f} MB; "
          f"initdb + start + SQL {first_s:.1f}s", file=sys.stderr)


def test_containerd_imports_every_archive_under_the_names_kubelet_asks_for(built: Built) -> None:
    if not (shutil.which("containerd") and shutil.which("ctr")):
        pytest.skip("containerd and ctr are not installed on this host")
    base = Path(tempfile.mkdtemp(prefix="zvctd", dir="/tmp"))
    sock = base / "c.sock"
    (base / "config.toml").write_text(
        f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
        f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{sock}"\n')
    daemon = subprocess.Popen(["containerd", "--config", str(base / "config.toml")],
                              stdout=subprocess.DEVNULL, stderr=(base / "log").open("w"))
    try:
        _wait_for("containerd's socket", sock.exists, timeout=30)
        ctr = ["ctr", "--address", str(sock), "--namespace", "k8s.io"]
        for image in built.images.images:
            proc = subprocess.run([*ctr, "images", "import", image.archive], capture_output=True, text=True,
                                  timeout=600, check=False)
            assert proc.returncode == 0, proc.stderr
        names = set(subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True,
                                   check=True).stdout.split())
        wanted = {ref for image in built.images.images for ref in image.refs}
        assert wanted <= names, wanted - names
        assert set(PAUSE_REFS) | {POSTGRES_REF} <= wanted
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)
