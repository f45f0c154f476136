"""Where the test suites find Kubernetes binaries (csi-sanity, kube-apiserver, the sidecars ...).

None of them is in a registry these machines reach, and the project never builds, downloads or
commits them: like envtest's KUBEBUILDER_ASSETS, the suites take them from the directory named by
$ZVOLT_K8S_BIN (default ~/.cache/zvolt-k8s/bin) and skip, in one line, where one is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "ZVOLT_K8S_BIN"


def default_dir() -> Path:
    return Path.home() / ".cache" / "zvolt-k8s" / "bin"


def k8s_bin_dir() -> Path:
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else default_dir()


def k8s_bin(name: str) -> Path | None:
    """The executable `name` in the binaries directory, or None when it is not there."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a plain file name")
    path = k8s_bin_dir() / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def missing(name: str) -> str:
    """The one line a suite skips with when `name` is absent."""
    return (
        f"{name} not found in {k8s_bin_dir()}: set {ENV} to a directory holding the Kubernetes "
        f"binaries (default {default_dir()})"
    )
