"""Where the suites find the Kubernetes binaries: $ZVOLT_K8S_BIN, else ~/.cache/zvolt-k8s/bin."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import k8sbin


def test_env_names_the_directory_and_only_executables_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZVOLT_K8S_BIN", str(tmp_path))
    exe, plain = tmp_path / "csi-sanity", tmp_path / "kubelet"
    exe.write_bytes(b"")
    exe.chmod(0o755)
    plain.write_bytes(b"")
    plain.chmod(0o644)
    (tmp_path / "dir").mkdir()
    assert k8sbin.k8s_bin("csi-sanity") == exe
    assert k8sbin.k8s_bin("kubelet") is None
    assert k8sbin.k8s_bin("dir") is None
    assert k8sbin.k8s_bin("etcd") is None
    assert k8sbin.missing("etcd") == (
        f"etcd not found in {tmp_path}: set ZVOLT_K8S_BIN to a directory holding the Kubernetes binaries "
        f"(default {Path.home() / '.cache' / 'zvolt-k8s' / 'bin'})"
    )


def test_default_dir_when_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ZVOLT_K8S_BIN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert k8sbin.k8s_bin_dir() == tmp_path / ".cache" / "zvolt-k8s" / "bin" == k8sbin.default_dir()
    assert k8sbin.k8s_bin("csi-sanity") is None


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".", "/usr/bin/true"])
def test_names_are_plain_file_names(bad: str) -> None:
    with pytest.raises(ValueError):
        k8sbin.k8s_bin(bad)
