"""csi-sanity, the CSI conformance suite (kubernetes-csi/csi-test v5.4.0), on the real stack.

The static csi-sanity binary comes from $ZVOLT_K8S_BIN (lab/k8sbin.py); this module skips in one
line where it is absent. It is copied into the guest and run there, in the root network
namespace, against the controller's and the node plugin's unix sockets: the node plugin runs in
the worker netns (systemd NetworkNamespacePath) but in the root mount namespace, so the staging
and target paths csi-sanity creates, checks and removes are the ones the plugin mounts on (the
fixture checks this). It runs twice, for mount volumes (ext4, the default fs type) and for raw
block, each with its own staging and mount dirs under one guest temp dir that is removed at the
end; its JUnit report is read back and parsed on the host. Its ModifyVolume specs run with
MUTABLE_PARAMETERS as the VolumeAttributesClass. Its GroupController specs run because the plugin
advertises GROUP_CONTROLLER_SERVICE; each run must pass all of them (GROUP_SPECS).
"""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from lab import junit, k8sbin
from lab.guest import SOCKETS, Lab
from zvolt.pb import csi_pb2, csi_pb2_grpc

pytestmark = pytest.mark.lab

SANITY = k8sbin.k8s_bin("csi-sanity")
if SANITY is None:
    pytest.skip(k8sbin.missing("csi-sanity"), allow_module_level=True)

MiB = 1 << 20
VOLUME_SIZE = 64 * MiB
EXPAND_SIZE = 128 * MiB  # csi-sanity's default is size + 1 GiB: fine on thin zvols, but more to resize2fs
GINKGO_TIMEOUT_S = 45 * 60  # TCG: every RPC is 10-50x slower than on hardware
# csi-sanity v5.4.0 knows CSI 1.12 except the GET_SNAPSHOT controller capability: its
# "ControllerGetCapabilities should return appropriate capabilities" spec fails on any capability
# it does not know. Only when the controller advertises GET_SNAPSHOT (an alpha capability, off by
# default) is exactly that spec skipped; the regex matches that one spec and not, say,
# GroupControllerGetCapabilities (checked with --ginkgo.dry-run: 1 of 92 specs).
GET_SNAPSHOT_SPEC = (
    r"Controller Service \[Controller Server\] ControllerGetCapabilities should return appropriate capabilities$"
)

# What csi-sanity's ModifyVolume specs (and its CreateVolume-with-a-VolumeAttributesClass spec)
# send as mutable_parameters; without the file they run with an empty class.
MUTABLE_PARAMETERS = "compression: zstd\n"

# csi-test v5.4.0's GroupController specs: capabilities, CreateVolumeGroupSnapshot without a name,
# GetVolumeGroupSnapshot without and with an unknown id, DeleteVolumeGroupSnapshot likewise.
GROUP_SPECS = 6

# The error text of csi-test's utils.Connect when a connection did not get READY within a minute.
CONNECT_TIMEOUT = "Connection timed out"


@dataclass(frozen=True)
class GuestSanity:
    lab: Lab
    dir: str  # guest temp dir: the binary and one sub-dir per run
    binary: str
    skip: tuple[str, ...]  # --ginkgo.skip regexes (see GET_SNAPSHOT_SPEC)
    mutable: str  # YAML file of MUTABLE_PARAMETERS


def _pid_mnt_ns(lab: Lab, pid: str) -> str:
    return lab.run(["readlink", f"/proc/{pid}/ns/mnt"], timeout=30).stdout.strip()


def _controller_advertises_get_snapshot(lab: Lab) -> bool:
    with grpc.insecure_channel(lab.grpc_target("controller")) as channel:
        caps = csi_pb2_grpc.ControllerStub(channel).ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=120
        )
    get_snapshot = csi_pb2.ControllerServiceCapability.RPC.GET_SNAPSHOT
    return any(c.rpc.type == get_snapshot for c in caps.capabilities)


def _leftover_mounts(lab: Lab, under: str) -> list[str]:
    out = lab.run(["findmnt", "--raw", "--noheadings", "--output", "TARGET"], timeout=60).stdout
    return [m for m in out.split() if m == under or m.startswith(under + "/")]


@pytest.fixture(scope="module")
def sanity(lab: Lab) -> Iterator[GuestSanity]:
    assert SANITY is not None
    if not lab.service_running("agent"):
        lab.start_agent()
    # Controller and node plugin are this checkout's code: always (re)start them from /src.
    lab.start_controller()
    lab.start_node()
    pid = lab.run(["systemctl", "show", "--property=MainPID", "--value", "zvolt-node.service"], timeout=30)
    node_ns, root_ns = _pid_mnt_ns(lab, pid.stdout.strip()), _pid_mnt_ns(lab, "self")
    assert node_ns == root_ns, f"node plugin mount namespace {node_ns} is not the root one {root_ns}"
    skip = (GET_SNAPSHOT_SPEC,) if _controller_advertises_get_snapshot(lab) else ()
    tmp = lab.run(["mktemp", "-d", "/tmp/zvolt-sanity.XXXXXXXX"], timeout=30).stdout.strip()
    try:
        binary = f"{tmp}/csi-sanity"
        lab.put(SANITY, binary, mode=0o755)
        mutable = f"{tmp}/mutable-parameters.yaml"
        lab.run(["tee", "--", mutable], input=MUTABLE_PARAMETERS, timeout=30)
        yield GuestSanity(lab=lab, dir=tmp, binary=binary, skip=skip, mutable=mutable)
    finally:
        left = _leftover_mounts(lab, tmp)
        for mount in sorted(left, reverse=True):
            lab.run(["umount", "--lazy", "--", mount], check=False, timeout=60)
        lab.run(["rm", "-rf", "--one-file-system", "--", tmp], timeout=120)
        assert not left, f"csi-sanity left mounts behind: {left}"


def sanity_argv(env: GuestSanity, access: str, run_dir: str) -> list[str]:
    argv = [
        # One Go thread: csi-test's utils.Connect waits for a state change away from the state it
        # reads, so it hangs for its full minute ("Connection timed out") when the connection got
        # READY on another thread before that read; a lone P makes that window practically closed.
        "env", "GOMAXPROCS=1",
        env.binary,
        f"--csi.endpoint=unix://{SOCKETS['node']}",
        f"--csi.controllerendpoint=unix://{SOCKETS['controller']}",
        f"--csi.stagingdir={run_dir}/staging",  # created and removed by csi-sanity for each spec
        f"--csi.mountdir={run_dir}/mount",
        f"--csi.testvolumeaccesstype={access}",
        f"--csi.testvolumesize={VOLUME_SIZE}",
        f"--csi.testvolumeexpandsize={EXPAND_SIZE}",
        f"--csi.testvolumemutableparameters={env.mutable}",
        f"--csi.junitfile={run_dir}/junit.xml",
        f"--ginkgo.timeout={GINKGO_TIMEOUT_S}s",
        "--ginkgo.no-color",
    ]  # fmt: skip
    return argv + [f"--ginkgo.skip={regex}" for regex in env.skip]


@dataclass(frozen=True)
class Run:
    report: junit.Report
    seconds: float
    exit_code: int
    tail: str
    xml: str


def run_sanity(env: GuestSanity, access: str, attempt: int) -> Run:
    lab = env.lab
    run_dir = f"{env.dir}/{access}-{attempt}"
    lab.run(["mkdir", "--", run_dir], timeout=30)
    start = time.monotonic()
    try:
        proc = lab.run(sanity_argv(env, access, run_dir), timeout=GINKGO_TIMEOUT_S + 300, check=False)
        seconds = time.monotonic() - start
        xml = lab.run(["cat", "--", f"{run_dir}/junit.xml"], check=False, timeout=60)
    finally:
        with contextlib.suppress(Exception):
            if not _leftover_mounts(lab, run_dir):  # else the fixture unmounts, removes and fails
                lab.run(["rm", "-rf", "--one-file-system", "--", run_dir], check=False, timeout=120)
    tail = "\n".join(proc.stdout.splitlines()[-80:])
    assert xml.returncode == 0, f"csi-sanity wrote no JUnit report (exit {proc.returncode}):\n{tail}\n{proc.stderr}"
    return Run(junit.parse(xml.stdout), seconds, proc.returncode, tail, xml.stdout)


def group_specs_passed(xml: str) -> int:
    """GroupController specs that ran and passed (neither skipped nor failed)."""
    root = ET.fromstring(xml)
    return sum(1 for case in root.iter("testcase") if "[GroupController" in case.get("name", "")
               and not any(case.find(tag) is not None for tag in ("skipped", "failure", "error")))


def only_connect_timeouts(report: junit.Report) -> bool:
    """Every failure is csi-test's own client giving up in utils.Connect (see sanity_argv): no RPC
    reached the driver. A driver that really does not accept connections fails the retry too."""
    return bool(report.failures) and all(CONNECT_TIMEOUT in f.message for f in report.failures)


@pytest.mark.parametrize("access", ["mount", "block"])
def test_csi_sanity(sanity: GuestSanity, access: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_sanity(sanity, access, 1)
    notes = []
    if sanity.skip:
        notes.append(f"skipped by request: {GET_SNAPSHOT_SPEC!r} (the controller advertises GET_SNAPSHOT)")
    if only_connect_timeouts(run.report):
        notes.append(f"run 1 lost to csi-test's connect race ({run.report.summary()}, {run.seconds:.0f}s): ran again")
        run = run_sanity(sanity, access, 2)
    report = run.report
    with capsys.disabled():
        print(f"\ncsi-sanity {access}: {report.summary()}, wall {run.seconds:.0f}s")
        for line in notes:
            print(f"  note: {line}")
        for f in report.failures:
            print(f"  {f.kind.upper()}: {f.name}\n    {f.message[:600]}")
    assert report.total > 0, f"csi-sanity ran no specs (exit {run.exit_code}):\n{run.tail}"
    problems = "\n".join(f"{f.kind}: {f.name}: {f.message[:600]}" for f in report.failures)
    assert report.failed == 0 and report.errors == 0, f"csi-sanity {access}: {report.summary()}\n{problems}"
    assert run.exit_code == 0, f"csi-sanity exited {run.exit_code} with a clean report:\n{run.tail}"
    assert group_specs_passed(run.xml) == GROUP_SPECS, "csi-sanity's GroupController specs did not all run and pass"
