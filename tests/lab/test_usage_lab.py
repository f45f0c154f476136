"""Usage figures and monitoring on the real stack.

- A branch family (a volume with 64 MiB written, a snapshot, a clone with 8 MiB more) measured by
  the agent's GetUsage, by `zvolt-csi --mode usage` and by `kubectl zvolt usage` (its exec runs
  that command in the guest), and summed per namespace in the agent's metrics.
- Every metric name the chart's dashboard and alerts use is exported by the running agent, node
  plugin and controller (scraped in the guest).
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import helm_python
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kubectl_zvolt import cli
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc

pytestmark = pytest.mark.lab

MiB = 1 << 20
T = 180
CHART = Path(__file__).resolve().parents[2] / "charts" / "zvolt"
# (netns, metrics address) of each component as the lab runs it.
SCRAPES = {"agent": ("storage", "127.0.0.1:9101"), "controller": (None, "127.0.0.1:9102"),
           "node": ("worker", "127.0.0.1:9103")}
# Added to agent/metrics.py by the commitment-limit work (issue 14 item 2): allowed to be absent
# until it lands, and reported when they are.
PENDING = frozenset({"zvolt_agent_pool_committed_bytes", "zvolt_agent_pool_commitment_ratio",
                     "zvolt_agent_pool_commitment_limit_ratio"})
# zvolt's metric names in PromQL (every one starts zvolt_; no function or label does).
_NAME = re.compile(r"\bzvolt_[a-zA-Z0-9_:]+")


def used_names(exprs: Sequence[str]) -> set[str]:
    return {m for e in exprs for m in _NAME.findall(e)}


def exported_names(exposition: str) -> set[str]:
    """Every series name a scrape can return: a counter's `_total`, a histogram's parts, even for
    families with no sample yet (a labelled counter before its first call)."""
    out: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            out.add(name)
            out.update(name + s for s in suffixes.get(kind, ()))
        elif line and not line.startswith("#"):
            out.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return out


def unexported(used: set[str], exported: set[str]) -> set[str]:
    return used - exported - PENDING


def dashboard_exprs() -> list[str]:
    dash = json.loads((CHART / "dashboards" / "zvolt.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def rule_exprs() -> list[str]:
    values = {"storageNetwork": {"cidr": "10.42.0.0/24"}, "metrics": {"prometheusRule": {"enabled": True}}}
    manifests = helm_python.Chart.load(CHART).render(values, name="zv", namespace="storage", is_install=True)
    docs = [d for path, text in manifests.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    return [r["expr"] for d in docs if d["kind"] == "PrometheusRule" for g in d["spec"]["groups"] for r in g["rules"]]


SCRAPE = """
import urllib.request
print(urllib.request.urlopen("http://{addr}/metrics", timeout=30).read().decode())
"""


def scrape(lab: Any, component: str) -> str:
    netns, addr = SCRAPES[component]
    return str(lab.py(SCRAPE.format(addr=addr), netns=netns, timeout=60).stdout)


def wait_ready(stub: pb_grpc.AgentStub, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stub.GetInfo(pb.GetInfoRequest(), timeout=10).ready:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise AssertionError("agent not ready")


@pytest.fixture(scope="module")
def services(lab: Any) -> Iterator[Any]:
    # This module's code: (re)start all three from /src, with metrics on, the agent sweeping often.
    lab.start_agent("--gc-interval", "2", "--usage-cycle", "0")
    lab.start_controller("--metrics-listen", SCRAPES["controller"][1])
    lab.start_node("--metrics-listen", SCRAPES["node"][1])
    yield lab


@pytest.fixture
def agent(services: Any) -> Iterator[pb_grpc.AgentStub]:
    channel = grpc.insecure_channel(services.grpc_target("agent"))
    stub = pb_grpc.AgentStub(channel)
    wait_ready(stub)
    yield stub
    channel.close()


def write(lab: Any, stub: pb_grpc.AgentStub, vid: str, offset_mib: int, mib: int) -> None:
    """Random (incompressible) data into the zvol, through the device the agent's publish makes."""
    host = f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"
    stub.PublishVolume(pb.PublishVolumeRequest(volume_id=vid, host_nqn=host), timeout=T)
    try:
        dev = f"/dev/zvol/tank/zvolt/v/{vid}"
        lab.run(["udevadm", "settle", "--timeout=60"], timeout=90)
        lab.run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1M", f"count={mib}", f"seek={offset_mib}",
                 "oflag=direct", "status=none"], timeout=300)
    finally:
        stub.UnpublishVolume(pb.UnpublishVolumeRequest(volume_id=vid, host_nqn=host), timeout=T)


def test_branch_family_usage_is_real(services: Any, agent: pb_grpc.AgentStub) -> None:
    lab = services
    ns = f"usage-{uuid.uuid4().hex[:6]}"
    suffix = uuid.uuid4().hex[:8]
    created: list[str] = []
    snap_id = ""
    try:
        origin = agent.CreateVolume(pb.CreateVolumeRequest(
            name=f"pvc-origin-{suffix}", size_bytes=256 * MiB,
            labels={"pvc-namespace": ns, "pvc-name": "db"}), timeout=T).volume
        created.append(origin.id)
        write(lab, agent, origin.id, 0, 64)
        snap_id = agent.CreateSnapshot(pb.CreateSnapshotRequest(name=f"snap-{suffix}", source_volume_id=origin.id),
                                       timeout=T).snapshot.id
        clone = agent.CreateVolume(pb.CreateVolumeRequest(
            name=f"pvc-branch-{suffix}", size_bytes=256 * MiB, source_snapshot_id=snap_id,
            labels={"pvc-namespace": ns, "pvc-name": "db-branch"}), timeout=T).volume
        created.append(clone.id)
        write(lab, agent, clone.id, 100, 8)  # past the origin's data: 8 MiB of new blocks
        lab.run(["zpool", "sync", "tank"], timeout=120)

        started = time.monotonic()
        resp = agent.GetUsage(pb.GetUsageRequest(volume_ids=[origin.id, clone.id, "vnothere"]), timeout=T)
        took = time.monotonic() - started
        got = {u.volume_id: u for u in resp.volumes}
        o, c = got[origin.id], got[clone.id]
        print(f"\nUSAGE GetUsage of 2 volumes (+1 unknown) {took * 1000:.0f} ms; pool total {resp.pool.total_bytes} "
              f"used {resp.pool.used_bytes} fragmentation {resp.pool.fragmentation_percent}%", flush=True)
        for name, u in (("origin", o), ("branch", c)):
            print(f"USAGE {name}: logical {u.logical_bytes / MiB:.2f} MiB, referenced {u.referenced_bytes / MiB:.2f}"
                  f" MiB, unique {u.unique_bytes / MiB:.2f} MiB, written {u.written_bytes / MiB:.2f} MiB, "
                  f"compressratio {u.compress_ratio:.2f}", flush=True)
        assert list(resp.not_found_ids) == ["vnothere"]
        assert (o.pvc_namespace, o.pvc_name, c.pvc_name) == (ns, "db", "db-branch")
        assert o.logical_bytes == c.logical_bytes == 256 * MiB
        # The origin keeps what it wrote (now held by its snapshot); the branch costs only its own writes.
        assert 64 * MiB <= o.unique_bytes <= 70 * MiB
        assert 8 * MiB <= c.unique_bytes <= 10 * MiB
        assert 72 * MiB <= c.referenced_bytes <= 78 * MiB
        assert 8 * MiB <= c.written_bytes <= 10 * MiB
        assert o.compress_ratio >= 1.0 and c.compress_ratio >= 1.0

        # The same figures through `zvolt-csi --mode usage` (as in the controller) and `kubectl zvolt usage`.
        def in_guest(namespace: str, pod: str, container: str, argv: Sequence[str]) -> tuple[int, str]:
            proc = lab.run([lab.python, "-m", "csi.main", *argv[1:]], timeout=T, check=False)
            return int(proc.returncode), str(proc.stdout)

        controller_args = ["--mode=controller", "--agents=storage-0=unix:///run/zvolt/agent.sock", "--insecure"]
        out = io.StringIO()
        code = cli.run(["usage", "--pvc-namespace", ns, "-o", "json"], connect=lambda t: _Pods(controller_args),  # type: ignore[arg-type,return-value]
                       execute=in_guest, out=out)
        doc = json.loads(out.getvalue())
        assert code == 0
        by_pvc = {p["pvc"]: p for p in doc["pvcs"]}
        assert by_pvc["db-branch"]["unique_bytes"] == c.unique_bytes
        assert by_pvc["db"]["volume_id"] == f"storage-0/{origin.id}"
        assert doc["namespaces"] == [{"namespace": ns, "pvcs": 2, "logical_bytes": 512 * MiB,
                                      "referenced_bytes": o.referenced_bytes + c.referenced_bytes,
                                      "unique_bytes": o.unique_bytes + c.unique_bytes}]
        table = io.StringIO()
        cli.run(["usage", "--pvc-namespace", ns], connect=lambda t: _Pods(controller_args),  # type: ignore[arg-type,return-value]
                execute=in_guest, out=table)
        print("USAGE kubectl zvolt usage:\n" + table.getvalue(), flush=True)

        # Summed per namespace in the agent's metrics once the sweep (every 2 s here) has passed.
        deadline = time.monotonic() + 120
        want = float(o.unique_bytes + c.unique_bytes)
        samples: dict[tuple[str, str], float] = {}
        while time.monotonic() < deadline:
            samples = {(s.name, s.labels.get("namespace", "")): s.value
                       for fam in text_string_to_metric_families(scrape(lab, "agent")) for s in fam.samples}
            if samples.get(("zvolt_agent_namespace_unique_bytes", ns)) == want:
                break
            time.sleep(2)
        assert samples.get(("zvolt_agent_namespace_unique_bytes", ns)) == want
        assert samples.get(("zvolt_agent_namespace_volumes", ns)) == 2
        assert ("zvolt_agent_pool_fragmentation_percent", "") in samples
    finally:
        for vid in reversed(created):
            agent.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=T)
        if snap_id:
            agent.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap_id), timeout=T)


class _Pods:
    namespace = "zvolt"

    def __init__(self, args: list[str]) -> None:
        self.args = args

    def list_pods(self) -> list[dict[str, Any]]:
        return [{"metadata": {"name": "ctrl"}, "status": {"phase": "Running"},
                 "spec": {"containers": [{"name": "zvolt-controller", "args": self.args}]}}]


def test_dashboard_and_alerts_use_only_exported_metrics(services: Any, agent: pb_grpc.AgentStub) -> None:
    exported: set[str] = set()
    for component in SCRAPES:
        exported |= exported_names(scrape(services, component))
    used = used_names(dashboard_exprs() + rule_exprs())
    assert len(used) > 20
    missing = unexported(used, exported)
    pending = sorted((PENDING & used) - exported)
    print(f"\nMETRICS dashboard+alerts use {len(used)} names, components export {len(exported)}; "
          f"missing: {sorted(missing)}; pending (commitment work not landed): {pending}", flush=True)
    assert missing == set(), f"dashboard/alerts use metrics no component exports: {sorted(missing)}"
    # The check itself catches a misspelt name.
    assert unexported(used | {"zvolt_agent_pool_fre_bytes"}, exported) == {"zvolt_agent_pool_fre_bytes"}
