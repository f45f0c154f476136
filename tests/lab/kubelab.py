"""Shared pieces of the lab suites with a real kubelet (test_kubelet_lab.py, test_helm_lab.py):
the `node` fixture joins the lab guest to the k8s suite's control plane (lab/kubenode.py) with
every image of `zvolt-lab oci-image --all` imported, and the waits they poll with. Skips in
one line without the binaries or the archives."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from lab import kubenode
from lab.guest import Lab
from lab.k8sbin import k8s_bin, missing
from lab.oci_image import ImageCache, chart_image_ref
from lab.paths import Cache, source_root
from tests.k8s.controlplane import KUBERNETES_SERVICE_IP, ControlPlane, Say

READY_TIMEOUT = 300.0
POD_TIMEOUT = 600.0


@dataclass(frozen=True)
class NodeImage:
    """One archive of `zvolt-lab oci-image --all` as node-images.json lists it."""

    name: str
    archive: Path
    refs: list[str]
    helm_set: dict[str, str]


@dataclass(frozen=True)
class Node:
    lab: Lab
    cluster: ControlPlane
    zvolt_image: str
    images: dict[str, NodeImage]
    timings: dict[str, float]

    @property
    def core(self) -> Any:
        return client.CoreV1Api(self.cluster.api)


def node_images() -> dict[str, NodeImage]:
    """pause (every pod's sandbox), the chart's sidecars, postgres and zvolt's own image."""
    cache = ImageCache.from_env()
    manifest = cache.node_images / "node-images.json"
    if not (manifest.is_file() and cache.archive.is_file()):
        pytest.skip(f"no OCI archives in {cache.root}: run `zvolt-lab oci-image --all` first")
    listed = json.loads(manifest.read_text())["images"]
    images = {i["name"]: NodeImage(i["name"], Path(i["archive"]), list(i["refs"]), dict(i["helm_set"]))
              for i in listed}
    if "pause" not in images:
        pytest.skip(f"{manifest} lists no pause image: run `zvolt-lab oci-image --all` again")
    images["zvolt"] = NodeImage("zvolt", cache.archive, [chart_image_ref(source_root())], {})
    return images


def wait(what: str, check: Callable[[], Any], timeout: float, on_fail: Callable[[], str],
         interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"{what} not within {timeout:.0f}s\n{on_fail()}")


def node_ready(core: Any) -> Any:
    try:
        node = core.read_node(kubenode.NODE_NAME)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
    return node if ready and ready[0].status == "True" else None


def _node_failure(lab: Lab, run_dir: Path) -> str:
    relay_log = run_dir / kubenode.RELAY_LOG
    relay = relay_log.read_text()[-2000:] if relay_log.exists() else "(no relay failures logged)"
    # A guest booted by older lab code has no guestfwd at all: kubelet then times out dialing.
    return f"guestfwd relay log:\n{relay}\nkubelet log:\n{lab.service_log(kubenode.KUBELET_SERVICE, 60)}"


@dataclass(frozen=True)
class Inputs:
    kubelet: Path
    images: dict[str, NodeImage]


@pytest.fixture(scope="module")
def inputs(k8s_bins: dict[str, Path]) -> Inputs:
    """Everything from outside the tree, checked before a guest boots or a control plane starts."""
    kubelet = k8s_bin("kubelet")
    if kubelet is None:
        pytest.skip(missing("kubelet"))
    return Inputs(kubelet=kubelet, images=node_images())


@pytest.fixture(scope="module")
def node(inputs: Inputs, lab: Lab, cluster: ControlPlane, say: Say) -> Iterator[Node]:
    timings: dict[str, float] = {}
    port = urlsplit(cluster.server).port
    assert port is not None
    run_dir = Cache.from_env().run_dir(lab.instance)
    kubenode.publish_apiserver(run_dir, port)
    assert cluster.pki is not None
    cert = cluster.pki.issue(f"kubelet-{kubenode.NODE_NAME}", kubenode.node_subject())

    t0 = time.monotonic()
    kubenode.install(lab, kubenode.NodeFiles(kubelet=inputs.kubelet, ca=cluster.ca, cert=cert.cert, key=cert.key),
                     KUBERNETES_SERVICE_IP)
    timings["install"] = time.monotonic() - t0
    t0 = time.monotonic()
    imported = kubenode.import_images(lab, [(i.archive, i.refs) for i in inputs.images.values()])
    timings["images"] = time.monotonic() - t0
    say(f"kubelet lab: kubelet + containerd config in {timings['install']:.1f} s, images "
        f"{', '.join(imported) or '(already there)'} imported in {timings['images']:.1f} s")
    core = client.CoreV1Api(cluster.api)
    tunnel = kubenode.KubeletTunnel.open(lab)
    kubelet_at = f"{kubenode.NODE_IP}:{kubenode.KUBELET_PORT}"
    cluster.route(kubelet_at, tunnel.local)
    t0 = time.monotonic()
    kubenode.start_kubelet(lab)
    try:
        wait(f"node {kubenode.NODE_NAME} Ready", lambda: node_ready(core), READY_TIMEOUT,
             lambda: _node_failure(lab, run_dir))
        timings["node ready"] = time.monotonic() - t0
        say(f"kubelet lab: node {kubenode.NODE_NAME} Ready {timings['node ready']:.1f} s after kubelet started")
        yield Node(lab=lab, cluster=cluster, zvolt_image=inputs.images["zvolt"].refs[0], images=inputs.images,
                   timings=timings)
    finally:
        kubenode.stop_kubelet(lab)
        cluster.route(kubelet_at, "")
        tunnel.close()
        try:
            core.delete_node(kubenode.NODE_NAME)
        except ApiException as err:
            if err.status != 404:
                raise
