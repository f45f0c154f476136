"""`kubectl zvolt rotate-key`: the plugin reads the class's Secret, runs `zvolt-csi --mode
rotate-key` in the controller container with the keys on stdin, and updates the Secret only when
every volume is on the new key. Here the exec runs the real zvolt-csi entry point in-process
against a real agent servicer (fake ZFS with its encryption model) over gRPC."""

from __future__ import annotations

import base64
import contextlib
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import csi.main
from agent.fakes import FakeNode, make_node
from agent.keystore import KeyStore
from agent.metrics import Metrics
from agent.server import AgentServicer, make_server
from agent.volumes import VolumeSpec
from kubectl_zvolt import cli
from kubectl_zvolt.errors import PluginError

GiB = 1 << 30
OLD, NEW, OTHER = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
CLASS = "enc"
SECRET = ("tenant-a", "enc-key")


def b64(key: bytes) -> str:
    return base64.b64encode(key.hex().encode()).decode()


class FakeKube:
    namespace = "zvolt"

    def __init__(self, port: int, volumes: list[str], parameters: dict[str, str] | None = None) -> None:
        self.port = port
        self.secret: dict[str, str] = {"encryptionKey": b64(OLD)}
        self.patches: list[dict[str, str | None]] = []
        self.pvs: list[dict[str, Any]] = [
            {"spec": {"storageClassName": CLASS, "csi": {"driver": "csi.zvolt.io", "volumeHandle": v}}}
            for v in volumes]
        self.pvs.append({"spec": {"storageClassName": "plain", "csi": {"driver": "csi.zvolt.io",
                                                                        "volumeHandle": "storage-0/vother"}}})
        ns, name = SECRET
        self.parameters = parameters if parameters is not None else {
            "encryption": "aes-256-gcm",
            **{f"csi.storage.k8s.io/{w}-secret-{p}": v for w in ("provisioner", "controller-publish",
                                                                  "controller-expand")
               for p, v in (("namespace", ns), ("name", name))}}

    def get_storage_class(self, name: str) -> dict[str, Any] | None:
        return {"metadata": {"name": name}, "provisioner": "csi.zvolt.io", "parameters": self.parameters} \
            if name == CLASS else None

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return {"metadata": {"name": name}, "data": dict(self.secret)} if (namespace, name) == SECRET else None

    def patch_secret_data(self, namespace: str, name: str, data: dict[str, str | None]) -> None:
        assert (namespace, name) == SECRET
        self.patches.append(data)
        for k, v in data.items():
            if v is None:
                self.secret.pop(k, None)
            else:
                self.secret[k] = v

    def list_pvs(self) -> list[dict[str, Any]]:
        return self.pvs

    def list_pods(self) -> list[dict[str, Any]]:
        args = ["--mode=controller", "--endpoint=unix:///csi/csi.sock", f"--agents=storage-0=127.0.0.1:{self.port}",
                "--insecure"]
        return [{"metadata": {"name": "ctrl-1"}, "status": {"phase": "Running"},
                 "spec": {"containers": [{"name": "zvolt-controller", "args": args}]}}]


class InProcess:
    """The exec: zvolt-csi's own main, its stdin the one line the plugin writes."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []

    def __call__(self, namespace: str, pod: str, container: str, argv: Sequence[str],
                 stdin: str | None = None) -> tuple[int, str]:
        assert (namespace, pod, container) == ("zvolt", "ctrl-1", "zvolt-controller")
        self.argvs.append(list(argv))
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.stdin", io.StringIO(stdin or ""))
            code = csi.main.main(list(argv[1:]))
        return code, out.getvalue()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[FakeNode, int, list[str]]]:
    store = KeyStore(str(tmp_path / "s"), os.urandom(32))
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"), keystore=store)
    metrics = Metrics()
    server = make_server(AgentServicer(node.volumes, node.readiness, metrics), metrics, workers=2)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ids = [node.volumes.create_volume(VolumeSpec(name=f"db-{i}", size=GiB, encryption_key=OLD)).id for i in range(2)]
    yield node, port, [f"storage-0/{i}" for i in ids]
    server.stop(None)


def dataset(node: FakeNode, volume_id: str) -> str:
    rec = node.index.volume(volume_id.split("/")[1])
    assert rec is not None
    return rec.dataset


def rotate(kube: FakeKube, exe: InProcess, tmp_path: Path, key: bytes = NEW) -> tuple[int, str]:
    keyfile = tmp_path / "new.key"
    keyfile.write_text(key.hex() + "\n")
    out = io.StringIO()
    code = cli.run(["rotate-key", CLASS, "--new-key-file", str(keyfile), "-n", "zvolt"],
                   connect=lambda t: kube, execute_input=exe, out=out)  # type: ignore[arg-type,return-value]
    return code, out.getvalue()


def test_every_volume_of_the_class_changes_key_then_the_secret(node: tuple[FakeNode, int, list[str]],
                                                                tmp_path: Path) -> None:
    fake, port, ids = node
    kube, exe = FakeKube(port, ids), InProcess()
    code, text = rotate(kube, exe, tmp_path)
    assert code == 0, text
    assert sorted(line.split()[1] for line in text.splitlines() if line.startswith("rotated")) == sorted(ids)
    datasets = [dataset(fake, i) for i in ids]
    assert [fake.zfs.keys[ds] for ds in datasets] == [NEW, NEW]
    assert kube.secret == {"encryptionKey": b64(NEW)}
    # The new key is recorded before any volume changes, and the old one replaced only at the end.
    assert kube.patches == [{"encryptionKeyNext": b64(NEW)}, {"encryptionKey": b64(NEW), "encryptionKeyNext": None}]
    assert all(OLD.hex() not in a and NEW.hex() not in a for argv in exe.argvs for a in argv), "keys stay off argv"
    assert "storage-0/vother" not in text


def test_a_failed_volume_keeps_the_old_key_in_the_secret_and_a_rerun_finishes(
        node: tuple[FakeNode, int, list[str]], tmp_path: Path) -> None:
    fake, port, ids = node
    kube, exe = FakeKube(port, [*ids, "storage-9/vgone"]), InProcess()
    code, text = rotate(kube, exe, tmp_path)
    assert code == 1 and "failed  storage-9/vgone" in text and "run the same command again" in text
    assert kube.secret == {"encryptionKey": b64(OLD), "encryptionKeyNext": b64(NEW)}
    with pytest.raises(PluginError, match="unfinished rotation to another key"):  # not a second key on top
        rotate(kube, exe, tmp_path, key=OTHER)
    kube.pvs = [pv for pv in kube.pvs if pv["spec"]["csi"]["volumeHandle"] != "storage-9/vgone"]
    code, text = rotate(kube, exe, tmp_path)  # the rotated ones take the new key again: no-op
    assert code == 0, text
    assert kube.secret == {"encryptionKey": b64(NEW)}
    assert {fake.zfs.keys[dataset(fake, i)] for i in ids} == {NEW}


@pytest.mark.parametrize(("parameters", "complaint"), [
    ({}, "is not encrypted"),
    ({"encryption": "aes-256-gcm", "csi.storage.k8s.io/provisioner-secret-namespace": "a",
      "csi.storage.k8s.io/provisioner-secret-name": "k"}, "must be one Secret"),
    ({"encryption": "aes-256-gcm", **{f"csi.storage.k8s.io/{w}-secret-{p}": v
                                      for w in ("provisioner", "controller-publish", "controller-expand")
                                      for p, v in (("namespace", "${pvc.namespace}"), ("name", "key"))}},
     "per claim"),
])
def test_classes_it_cannot_rotate_are_refused(parameters: dict[str, str], complaint: str, tmp_path: Path) -> None:
    kube = FakeKube(1, [], parameters)
    with pytest.raises(PluginError, match=complaint):
        rotate(kube, InProcess(), tmp_path)
    assert kube.patches == []


def test_a_bad_new_key_is_refused_before_anything_changes(tmp_path: Path) -> None:
    kube = FakeKube(1, [])
    keyfile = tmp_path / "k"
    keyfile.write_text("abcd\n")
    with pytest.raises(Exception, match="encryptionKey"):
        cli.run(["rotate-key", CLASS, "--new-key-file", str(keyfile)], connect=lambda t: kube,  # type: ignore[arg-type,return-value]
                execute_input=InProcess(), out=io.StringIO())
    assert kube.patches == []
    with pytest.raises(PluginError, match="already holds this key"):
        rotate(kube, InProcess(), tmp_path, key=OLD)
