"""cluster: the CSI controller in front of many storage nodes (issue 16, item 3), on this host.

N agents (real agent servicer on the fake backends, `bench/clusteragents.py`), each holding V
volumes + V snapshots in its index, each on its own unix-socket gRPC server, K per process. Two
real controllers talk gRPC to them: one with all N agents, the baseline with one agent (the first,
which also serves the N-agent controller's placements), started in the same run. Calls to the two
are interleaved sample by sample, so machine load falls on both alike. Measured:

- controller start -> ready (CSI Probe and GetCapacity answer), N agents vs 1;
- CreateVolume and clone-from-snapshot p50/p95, N agents vs 1 (bar <= 1.2x);
- ListVolumes / ListSnapshots paged through N x V entries at the CO's default page (max_entries 0):
  time, pages, largest response, controller RSS before / after / peak; baseline: the 1-agent
  controller paging its V entries (per-entry time);
- one agent SIGSTOPped: CreateVolume on the other nodes, with and without placement records (a
  controller with Kubernetes discovery has them; static discovery has none), and ListVolumes.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from bench import clusteragents, restorefake, simulate
from bench.clusteragents import Child
from bench.progress import Progress
from bench.results import Row, SuiteResult
from bench.stats import summarize
from zvolt.pb import csi_pb2, csi_pb2_grpc

GiB = 1 << 30
MAX_MESSAGE = 4 << 20  # gRPC's default receive limit: a bigger response fails the CO's call
LATENCY_BAR = 1.2
SILENT_SAMPLES = 3
CAP = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
)


@dataclass(frozen=True)
class ClusterConfig:
    agents: int = 100
    volumes: int = 10_000          # per agent (each with one snapshot)
    per_process: int = 1           # agent identities served by one process
    samples: int = 20

    @staticmethod
    def quick() -> ClusterConfig:
        return ClusterConfig(agents=10, volumes=1_000, per_process=1, samples=5)


def node_name(i: int) -> str:
    return f"node-{i:03d}"


class Controller:
    """One controller process and a client to it."""

    def __init__(self, child: Child, endpoint: str, started: float) -> None:
        self.child, self.endpoint, self.started = child, endpoint, started
        self.channel = grpc.insecure_channel(endpoint)
        self.ctl = csi_pb2_grpc.ControllerStub(self.channel)
        self.ident = csi_pb2_grpc.IdentityStub(self.channel)

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds from process start to Probe ready and GetCapacity answered."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ident.Probe(csi_pb2.ProbeRequest(), timeout=5, wait_for_ready=True).ready.value:
                    self.ctl.GetCapacity(csi_pb2.GetCapacityRequest(volume_capabilities=[CAP]), timeout=60)
                    return time.perf_counter() - self.started
            except grpc.RpcError:
                if time.monotonic() > deadline or self.child.proc.poll() is not None:
                    raise
            time.sleep(0.05)

    def close(self) -> None:
        self.channel.close()
        self.child.stop()


def create_request(name: str, snapshot_id: str = "", pvc: bool = False) -> Any:
    req = csi_pb2.CreateVolumeRequest(name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
                                      volume_capabilities=[CAP])
    if snapshot_id:
        req.volume_content_source.snapshot.snapshot_id = snapshot_id
    if pvc:
        req.parameters["csi.storage.k8s.io/pvc/name"] = name
        req.parameters["csi.storage.k8s.io/pvc/namespace"] = "bench"
    return req


def timed_call(fn: Callable[[], Any]) -> tuple[float, str]:
    """(seconds, status code name) of one call; an error is a result here, not an exception."""
    t0 = time.perf_counter()
    try:
        fn()
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    return time.perf_counter() - t0, code


def page_through(ctl: Any, method: str, progress: Progress, label: str, pid: int) -> dict[str, Any]:
    """Every page of ListVolumes / ListSnapshots at max_entries 0 (external-attacher's default)."""
    request = csi_pb2.ListVolumesRequest if method == "ListVolumes" else csi_pb2.ListSnapshotsRequest
    rss_before = clusteragents.rss_kib(pid)
    token, pages, entries, largest, slowest = "", 0, 0, 0, 0.0
    t0 = last = time.perf_counter()
    while True:
        p0 = time.perf_counter()
        resp = getattr(ctl, method)(request(starting_token=token), timeout=120)
        slowest = max(slowest, time.perf_counter() - p0)
        pages += 1
        entries += len(resp.entries)
        largest = max(largest, resp.ByteSize())
        token = resp.next_token
        if not token:
            break
        if time.perf_counter() - last > 20:
            last = time.perf_counter()
            progress.say(f"cluster: {label} {method}: {entries:,} entries in {pages:,} pages "
                         f"({last - t0:.0f} s, controller RSS {clusteragents.rss_kib(pid) / 1024:.0f} MiB)")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "pages": pages, "entries": entries, "largest_bytes": largest,
            "slowest_page_seconds": slowest, "us_per_entry": seconds / max(1, entries) * 1e6,
            "controller_rss_before_kib": rss_before, "controller_rss_after_kib": clusteragents.rss_kib(pid),
            "controller_hwm_kib": clusteragents.hwm_kib(pid)}


class Cluster:
    """The agent processes and controllers of one run, torn down on close."""

    def __init__(self, cfg: ClusterConfig, progress: Progress, tmp: str, configfs: str) -> None:
        self.cfg, self.progress, self.tmp, self.configfs = cfg, progress, tmp, configfs
        self.agents: list[Child] = []
        self.controllers: list[Controller] = []
        self.sockets = [os.path.join(tmp, "s", f"{node_name(i)}.sock") for i in range(cfg.agents)]
        self.log = Path(tmp) / "children.log"

    def start_agents(self) -> dict[str, Any]:
        cfg, tmp = self.cfg, self.tmp
        os.makedirs(os.path.join(tmp, "s"), exist_ok=True)
        template = os.path.join(tmp, "template")
        t0 = time.perf_counter()
        fill_s = simulate.populate(template, 0, cfg.volumes)
        specs = []
        for i in range(cfg.agents):
            state = os.path.join(tmp, "state", node_name(i))
            clusteragents.copy_index(template, state)
            specs.append({"name": node_name(i), "state": state, "socket": self.sockets[i],
                          "configfs": os.path.join(self.configfs, node_name(i))})
        prepared = time.perf_counter() - t0
        self.progress.say(f"cluster: {cfg.agents} indexes of {cfg.volumes:,} volumes + {cfg.volumes:,} snapshots "
                          f"ready in {prepared:.0f} s; starting {cfg.agents} agents, {cfg.per_process} per process")
        t1 = time.perf_counter()
        for lo in range(0, cfg.agents, cfg.per_process):
            self.agents.append(clusteragents.spawn("agents", {"agents": specs[lo:lo + cfg.per_process]}, self.log))
        clusteragents.wait_ready(self.agents, 1800, lambda r, n: self.progress.say(
            f"cluster: {r}/{n} agent processes serving ({time.perf_counter() - t1:.0f} s)"))
        started = time.perf_counter() - t1
        rss = [clusteragents.rss_kib(a.pid) for a in self.agents]
        pss = [clusteragents.pss_kib(a.pid) for a in self.agents]
        self.progress.say(f"cluster: {cfg.agents} agents serving after {started:.0f} s; agent processes RSS "
                          f"{sum(rss) / 1024:.0f} MiB (PSS {sum(pss) / 1024:.0f} MiB)")
        return {"agents": cfg.agents, "processes": len(self.agents), "volumes_per_agent": cfg.volumes,
                "snapshots_per_agent": cfg.volumes, "published_per_agent": min(simulate.PUBLISHED, cfg.volumes),
                "template_fill_seconds": fill_s, "prepare_seconds": prepared, "start_seconds": started,
                "rss_kib_total": sum(rss), "pss_kib_total": sum(pss), "rss_kib_per_process": max(rss)}

    def controller(self, agents: int, records: bool = False) -> Controller:
        tag = f"c{agents}{'r' if records else ''}"
        endpoint = f"unix://{os.path.join(self.tmp, 's', tag + '.sock')}"
        spec = {"endpoint": endpoint, "records": records,
                "agents": ",".join(f"{node_name(i)}=unix://{self.sockets[i]}" for i in range(agents))}
        started = time.perf_counter()
        child = clusteragents.spawn("controller", spec, self.log)
        ctl = Controller(child, endpoint, started)
        self.controllers.append(ctl)
        return ctl

    def close(self) -> None:
        for c in self.controllers:
            c.close()
        for a in self.agents:
            a.stop()


def _latencies(ctls: dict[str, Controller], samples: int, make: Callable[[str, int], Any]) -> dict[str, Any]:
    """CreateVolume on each controller in turn, sample by sample (load falls on all alike)."""
    out: dict[str, list[float]] = {key: [] for key in ctls}
    for k in range(samples):
        for key, ctl in ctls.items():
            req = make(key, k)
            t0 = time.perf_counter()
            ctl.ctl.CreateVolume(req, timeout=120)
            out[key].append(time.perf_counter() - t0)
    return {key: summarize(v).as_dict() for key, v in out.items()}


def measure(cfg: ClusterConfig, progress: Progress) -> dict[str, Any]:
    data: dict[str, Any] = {"config": {"agents": cfg.agents, "volumes_per_agent": cfg.volumes,
                                       "agents_per_process": cfg.per_process, "samples": cfg.samples},
                            "load_average": list(os.getloadavg())}
    # The emulated configfs trees (300 exports a node, ~11 MB each on disk) live in memory: on this
    # shared disk, writing and removing 100 of them took minutes.
    with tempfile.TemporaryDirectory(prefix="zvolt-bench-cluster-") as tmp, \
            tempfile.TemporaryDirectory(prefix="zvolt-bench-cluster-cfs-", dir=restorefake._tmp_base()) as cfs:
        cluster = Cluster(cfg, progress, tmp, cfs)
        try:
            data["agents"] = cluster.start_agents()
            _measure_controllers(cluster, cfg, progress, data)
        finally:
            cluster.close()
    data["load_average_after"] = list(os.getloadavg())
    return data


def _measure_controllers(cluster: Cluster, cfg: ClusterConfig, progress: Progress, data: dict[str, Any]) -> None:
    n = cfg.agents
    # Kubernetes discovery gives the controller placement records (PVC annotations); the
    # static list has none, so both are measured: records in memory for the first two.
    c1 = cluster.controller(1, records=True)
    data["start_1"] = {"seconds": c1.wait_ready()}
    cn = cluster.controller(n, records=True)
    data["start_n"] = {"seconds": cn.wait_ready()}
    cs = cluster.controller(n)
    cs.wait_ready()
    progress.say(f"cluster: controller start -> ready: 1 agent {data['start_1']['seconds']:.2f} s, "
                 f"{n} agents {data['start_n']['seconds']:.2f} s")
    data["controller_rss_kib_ready"] = clusteragents.rss_kib(cn.child.pid)
    ctls = {"one": c1, "many": cn, "many_static": cs}

    data["create"] = _latencies(ctls, cfg.samples,
                                lambda key, k: create_request(f"bench-cl-new-{key}-{k}".replace("_", "-"), pvc=True))
    progress.say(f"cluster: CreateVolume p50 1 agent {data['create']['one']['p50_ms']:.1f} ms, {n} agents "
                 f"{data['create']['many']['p50_ms']:.1f} ms (static, no records: "
                 f"{data['create']['many_static']['p50_ms']:.1f} ms)")
    snaps = {}
    for key, ctl in ctls.items():
        tag = key.replace("_", "-")
        vol = ctl.ctl.CreateVolume(create_request(f"bench-cl-src-{tag}", pvc=True), timeout=120).volume
        snaps[key] = ctl.ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=f"bench-cl-snap-{tag}", source_volume_id=vol.volume_id), timeout=120).snapshot.snapshot_id
    data["clone"] = _latencies(ctls, cfg.samples, lambda key, k: create_request(
        f"bench-cl-clone-{key}-{k}".replace("_", "-"), snaps[key], pvc=True))
    progress.say(f"cluster: clone p50 1 agent {data['clone']['one']['p50_ms']:.1f} ms, {n} agents "
                 f"{data['clone']['many']['p50_ms']:.1f} ms (static, no records: "
                 f"{data['clone']['many_static']['p50_ms']:.1f} ms)")

    for method, key in (("ListVolumes", "list_volumes"), ("ListSnapshots", "list_snapshots")):
        base = page_through(c1.ctl, method, progress, "1 agent", c1.child.pid)
        full = page_through(cn.ctl, method, progress, f"{n} agents", cn.child.pid)
        data[key] = {"one": base, "many": full}
        progress.say(f"cluster: {method} through {full['entries']:,} entries: {full['seconds']:.1f} s, "
                     f"{full['pages']:,} pages, largest {full['largest_bytes']:,} B, controller RSS "
                     f"{full['controller_rss_before_kib'] / 1024:.0f} -> {full['controller_rss_after_kib'] / 1024:.0f} "
                     f"MiB (1 agent: {base['us_per_entry']:.1f} µs/entry)")

    data["silent"] = _silent(cluster, c1, cn, cs, snaps["many"], cfg, progress)


def _silent(cluster: Cluster, c1: Controller, cr: Controller, cn: Controller, snap: str, cfg: ClusterConfig,
            progress: Progress) -> dict[str, Any]:
    """One agent (the last) SIGSTOPped: a node that accepts connections and never answers.
    `cr` has placement records, `cn` (static discovery) has none."""
    n = cfg.agents
    out: dict[str, Any] = {"node": node_name(n - 1), "samples": SILENT_SAMPLES}

    def series(ctl: Controller, label: str, make: Callable[[int], Any]) -> dict[str, Any]:
        runs = []
        for k in range(SILENT_SAMPLES):
            runs.append(timed_call(partial(ctl.ctl.CreateVolume, make(k), timeout=120)))
            progress.say(f"cluster: {label}: CreateVolume {runs[-1][1]} in {runs[-1][0]:.2f} s")
        return {"p50_ms": summarize([s for s, _ in runs]).p50_ms, "codes": [c for _, c in runs], "label": label}

    before = {
        "create_records": series(cr, "before", lambda k: create_request(f"bench-cl-r0-{k}", pvc=True)),
        "clone_records": series(cr, "before", lambda k: create_request(f"bench-cl-rc0-{k}", snap, pvc=True)),
    }
    victim = next(a for a in cluster.agents if node_name(n - 1) in a.info.get("agents", []))
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        progress.say(f"cluster: agent {node_name(n - 1)} SIGSTOPped; CreateVolume and ListVolumes on the others")
        during = {
            "create_static": series(cn, "static discovery, no records",
                                    lambda k: create_request(f"bench-cl-s1-{k}")),
            "create_records": series(cr, "with placement records",
                                     lambda k: create_request(f"bench-cl-r1-{k}", pvc=True)),
            "clone_records": series(cr, "clone on another node, with records",
                                    lambda k: create_request(f"bench-cl-rc1-{k}", snap, pvc=True)),
        }
        first = timed_call(lambda: cn.ctl.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=100), timeout=120))
        from csi.controller import PageToken

        token = PageToken(node_name(n - 1), "").encode()
        reach = timed_call(lambda: cn.ctl.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=100,
                                                                                 starting_token=token), timeout=120))
        cap = timed_call(lambda: cn.ctl.GetCapacity(csi_pb2.GetCapacityRequest(volume_capabilities=[CAP]),
                                                    timeout=120))
        other = timed_call(lambda: c1.ctl.CreateVolume(create_request("bench-cl-one-during"), timeout=120))
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    out.update(before=before, during=during,
               list_first_page={"seconds": first[0], "code": first[1]},
               list_page_at_silent={"seconds": reach[0], "code": reach[1]},
               get_capacity={"seconds": cap[0], "code": cap[1]},
               one_agent_controller_create={"seconds": other[0], "code": other[1]})
    for key, s in during.items():
        progress.say(f"cluster: silent node, {key}: p50 {s['p50_ms']:.0f} ms, {s['codes']}")
    return out


def rows(d: dict[str, Any]) -> list[Row]:
    n = d["config"]["agents"]
    total = n * d["config"]["volumes_per_agent"]
    one = "1 agent, same run"
    out = [
        Row(f"controller start -> ready (Probe + GetCapacity), {n} agents", d["start_n"]["seconds"], "s",
            d["start_1"]["seconds"], one),
    ]
    for key, what in (("create", "CreateVolume"), ("clone", "clone from snapshot")):
        for p in ("p50_ms", "p95_ms"):
            out.append(Row(f"{what} {p[:3]}, {n} agents", d[key]["many"][p], "ms", d[key]["one"][p], one,
                           f"<= {LATENCY_BAR:g}x"))
        if "many_static" in d[key]:
            out.append(Row(f"{what} p50, {n} agents, static discovery (no placement records)",
                           d[key]["many_static"]["p50_ms"], "ms", d[key]["one"]["p50_ms"], one))
    for key, what in (("list_volumes", "ListVolumes"), ("list_snapshots", "ListSnapshots")):
        m, b = d[key]["many"], d[key]["one"]
        out += [
            Row(f"{what}: all pages, {m['pages']:,} pages", m["seconds"], "s", size=m["entries"]),
            Row(f"{what}: time per entry", m["us_per_entry"], "µs", b["us_per_entry"], f"{one} ({b['entries']:,})",
                "flat", m["entries"]),
            Row(f"{what}: largest response", m["largest_bytes"] / 1024, "KiB", MAX_MESSAGE / 1024, "gRPC limit",
                "< 1x", m["entries"]),
            Row(f"{what}: controller RSS after paging", m["controller_rss_after_kib"] / 1024, "MiB",
                m["controller_rss_before_kib"] / 1024, "before paging", "bounded", m["entries"]),
        ]
    s = d["silent"]
    for key, what in (("create_records", "CreateVolume"), ("clone_records", "clone")):
        out.append(Row(f"one agent stopped: {what} p50, with records ({','.join(s['during'][key]['codes'])})",
                       s["during"][key]["p50_ms"], "ms", s["before"][key]["p50_ms"], "before the stop",
                       "one short deadline"))
    st = s["during"]["create_static"]
    out.append(Row(f"one agent stopped: CreateVolume p50, static agents ({','.join(st['codes'])})", st["p50_ms"],
                   "ms", s["before"]["create_records"]["p50_ms"], "before the stop"))
    for key, what in (("list_first_page", "ListVolumes, a page of other nodes"),
                      ("list_page_at_silent", "ListVolumes, the page reaching it"),
                      ("get_capacity", "GetCapacity")):
        out.append(Row(f"one agent stopped: {what} ({s[key]['code']})", s[key]["seconds"] * 1000, "ms"))
    a = d["agents"]
    out.append(Row(f"memory: {a['processes']} agent processes (PSS; RSS {a['rss_kib_total'] / 1024**2:.1f} GiB)",
                   a["pss_kib_total"] / 1024, "MiB", size=total))
    out.append(Row("memory: controller RSS when ready", d["controller_rss_kib_ready"] / 1024, "MiB", size=total))
    return out


def run(cfg: ClusterConfig, progress: Progress) -> SuiteResult:
    res = SuiteResult("cluster")
    t0 = time.perf_counter()
    try:
        res.data = measure(cfg, progress)
        res.rows = rows(res.data)
        a = res.data["agents"]
        res.notes.append(f"{a['agents']} agents (real agent servicer on fakes, own unix-socket gRPC server each, "
                         f"{cfg.per_process} per process), {a['volumes_per_agent']:,} volumes + as many snapshots "
                         f"each; host load average {res.data['load_average'][0]:.1f} at start")
    except Exception as e:
        res.error = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
    res.seconds = time.perf_counter() - t0
    return res
