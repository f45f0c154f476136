"""Fixtures of the k8s suite: `cluster` (a real control plane for the session), `zvolt_chart`
(the chart installed into it once), `controller_pod` (the installed controller Deployment as
local processes-to-be, fresh per test). Without the binaries every test skips with one line."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.guest import STORAGE_NETWORK

from .chartpod import Chart, LocalPod, helm_install, local_pod, project_commands
from .controlplane import CONTROL_PLANE_BINS, SIDECAR_BINS, ControlPlane, Obj, Say, crds_dir, find_binaries, start

RELEASE = "zvolt"
NAMESPACE = "zvolt-system"
# One controller replica: the harness plays kubelet for one pod of it. The storage network has
# no default (the render fails without one): the lab's, where this suite's agent and node run.
# The lab's agent runs outside the cluster with the chart's one agent certificate
# (tls.agentCertificates=shared); per-node certificates: test_agent_certificates_k8s.py.
CHART_VALUES: Obj = {"controller": {"replicas": 1}, "storageNetwork": {"cidr": STORAGE_NETWORK},
                     "tls": {"agentCertificates": "shared"}}


@pytest.fixture(scope="session")
def say(request: pytest.FixtureRequest) -> Say:
    """Progress lines on the terminal even while pytest captures output (timings)."""
    reporter: Any = request.config.pluginmanager.get_plugin("terminalreporter")
    capture: Any = request.config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if reporter is None:
            print(line, file=sys.stderr)
            return
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write_line(line)

    return write


SKIP = "k8s suite skipped: "


@pytest.fixture(scope="session")
def k8s_bins() -> dict[str, Path]:
    found, missing = find_binaries(CONTROL_PLANE_BINS + SIDECAR_BINS)
    if missing:
        pytest.skip(SKIP + missing)
    return found


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Every test skipped for missing binaries reports the same place, so `-ra` shows the
    reason on one line ("SKIPPED [N] tests/k8s/conftest.py:LINE: k8s suite skipped: ...")."""
    report = yield
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple) and SKIP in str(longrepr[2]):
        report.longrepr = (__file__, _SKIP_LINE, longrepr[2])
    return report


_SKIP_LINE = next(n for n, line in enumerate(Path(__file__).read_text().splitlines(), 1) if "pytest.skip(SKIP" in line)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def cluster(k8s_bins: dict[str, Path], say: Say) -> Iterator[ControlPlane]:
    # A plain `kill` of pytest would end it without running this fixture's teardown: turn
    # SIGTERM into an interrupt while the control plane runs, so it is stopped and removed.
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        cp = start(k8s_bins, crds_dir(), say)
        try:
            yield cp
        finally:
            cp.close()
    finally:
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="session")
def zvolt_chart(cluster: ControlPlane, say: Say) -> Chart:
    t0 = time.monotonic()
    summary = helm_install(cluster, RELEASE, NAMESPACE, CHART_VALUES)
    cluster.timings["helm install"] = time.monotonic() - t0
    say(f"k8s: helm install {RELEASE} (charts/zvolt) in {cluster.timings['helm install']:.1f} s")
    return Chart(release=RELEASE, namespace=NAMESPACE, summary=summary, controller=f"{RELEASE}-controller")


@pytest.fixture
def controller_pod(cluster: ControlPlane, zvolt_chart: Chart) -> Iterator[LocalPod]:
    """The controller Deployment's pod as local processes-to-be; whatever a test starts from
    it (or otherwise) is stopped when the test ends."""
    cluster.check_alive()
    before = len(cluster.procs.started)
    pod = local_pod(cluster, zvolt_chart.namespace, zvolt_chart.controller, commands=project_commands())
    try:
        yield pod
    finally:
        cluster.procs.stop(cluster.procs.started[before:])
