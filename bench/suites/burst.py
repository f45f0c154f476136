"""burst: branches made in bursts, through CSI, next to the same burst of bare `lzc_*` calls.

Platforms branch in bursts (a CI run, an agent fleet): N CreateVolume-from-snapshot calls with
K in flight through the CSI controller, then a CreateSnapshot of each new volume, then
DeleteSnapshot and DeleteVolume of all of them. The baseline is the same N calls, K at once,
of `lzc_clone` / `lzc_snapshot` / `lzc_destroy_snaps` / `lzc_destroy` inside the guest, on the
same pool, in the same run. The CSI side also pays the host -> guest gRPC hop and the agent's
fsync'd intents; the throughput ratio shows whether those serialize the node.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any

import grpc

from bench.progress import Progress
from bench.results import Row, SuiteResult
from bench.stats import percentile, summarize
from bench.suites.context import Context

MODULE = "bench.inguest_burst"
TICK_S = 20.0
# (phase, CSI label, bare label)
PHASES = (
    ("clone", "CreateVolume from snapshot", "lzc_clone"),
    ("snapshot", "CreateSnapshot", "lzc_snapshot"),
    ("delete_snapshot", "DeleteSnapshot", "lzc_destroy_snaps"),
    ("delete_volume", "DeleteVolume", "lzc_destroy"),
)
TARGET = ">= 0.8x"
# The zvolt processes in the guest whose CPU a CSI burst costs (the bare burst's is its own).
SERVICES = {"agent": ["-m", "agent.main"], "controller": ["-m", "csi.main", "controller"]}
# What a CSI sidecar retries (with backoff) rather than fail the claim: the burst does the same, so
# one call that outlives its deadline on an overloaded guest costs time, not the whole run.
RETRYABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
ATTEMPTS = 8


@contextmanager
def _ticking(progress: Progress, what: str, done: Callable[[], str]) -> Iterator[None]:
    """A progress line every TICK_S while a burst runs (a 1,000-call burst takes minutes under TCG)."""
    stop = threading.Event()
    t0 = time.monotonic()

    def tick() -> None:
        while not stop.wait(TICK_S):
            progress.say(f"burst: {what} still running ({time.monotonic() - t0:.0f} s{done()})")

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _csi_burst(progress: Progress, what: str, calls: Sequence[Callable[[], Any]], in_flight: int,
               cpu: Callable[[], float] = lambda: 0.0) -> tuple[list[Any], dict[str, Any]]:
    """Run the calls K at once: results in call order, per-call seconds (retries included), the
    wall time, the retries and what `cpu()` (the zvolt processes' CPU seconds) grew by."""
    finished = [0]
    retries = [0]
    lock = threading.Lock()

    def one(fn: Callable[[], Any]) -> tuple[Any, float]:
        t0 = time.perf_counter()
        for attempt in range(ATTEMPTS):
            try:
                out = fn()
                break
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE or attempt == ATTEMPTS - 1:
                    raise
                with lock:
                    retries[0] += 1
                time.sleep(min(2.0 ** attempt, 16.0))
        dt = time.perf_counter() - t0
        with lock:
            finished[0] += 1
        return out, dt

    c0 = cpu()
    t0 = time.perf_counter()
    with _ticking(progress, what, lambda: f", {finished[0]}/{len(calls)} done"), \
            ThreadPoolExecutor(max_workers=in_flight) as pool:
        done = list(pool.map(one, calls))
    wall = time.perf_counter() - t0
    return [r for r, _ in done], {"seconds": [dt for _, dt in done], "wall": wall, "cpu_s": cpu() - c0,
                                  "retries": retries[0]}


def _bare(ctx: Context, command: str, args: dict[str, Any], what: str) -> dict[str, Any]:
    with _ticking(ctx.progress, what, lambda: ""):
        out: dict[str, Any] = ctx.guest.call(command, args, timeout=7200, module=MODULE)
    return out


def figures(burst: dict[str, Any]) -> dict[str, float]:
    """Throughput, latency and CPU per call of one burst, from its per-call seconds, wall time and
    the guest CPU seconds it cost (the bare burst's own process; the agent + controller for CSI)."""
    seconds = burst["seconds"]
    lat = summarize(seconds).as_dict()
    return {"calls": len(seconds), "wall_s": burst["wall"], "per_s": len(seconds) / burst["wall"],
            "p50_ms": lat["p50_ms"], "p99_ms": percentile([s * 1000 for s in seconds], 99),
            "cpu_ms_per_call": 1000 * burst["cpu_s"] / len(seconds), "retries": burst.get("retries", 0)}


def _service_cpu(ctx: Context) -> float:
    return float(sum(ctx.guest.call("cpu", {"match": SERVICES}, timeout=120, module=MODULE).values()))


def run(ctx: Context) -> SuiteResult:
    res = SuiteResult("burst")
    n, k = ctx.cfg.burst_count, ctx.cfg.burst_in_flight
    tag = f"u{ctx.run_id}"
    parent = f"{ctx.pool}/benchburst"
    src = f"{parent}/src"
    origin = f"{src}@base"
    bare: dict[str, dict[str, Any]] = {}
    csi: dict[str, dict[str, Any]] = {}
    ctx.guest.call("ensure-parent", {"dataset": parent})
    ctx.guest.call("zvol-create", {"dataset": src, "size_bytes": 1 << 30, "volmode": "none"})
    try:
        _bare(ctx, "snapshot", {"snapshot": origin}, "the burst's origin snapshot")
        common = {"parent": parent, "tag": tag, "count": n, "in_flight": k, "snapshot": "s"}
        for phase, command, bare_label in (("clone", "clones", "lzc_clone"), ("snapshot", "snapshots", "lzc_snapshot"),
                                           ("delete_snapshot", "destroy-snapshots", "lzc_destroy_snaps"),
                                           ("delete_volume", "destroy-clones", "lzc_destroy")):
            bare[phase] = figures(_bare(ctx, command, {**common, "origin": origin}, f"{n} x {bare_label}"))
            ctx.progress.say(f"burst: bare {bare_label} x {n}, {k} in flight: {bare[phase]['per_s']:.1f}/s, "
                             f"p99 {bare[phase]['p99_ms']:.0f} ms")
    finally:
        ctx.guest.call("zfs-destroy", {"dataset": parent, "recursive": True})
    if ctx.csi is None:
        res.notes.append("CSI controller not reachable: only the bare bursts were measured")
    else:
        try:
            _csi_bursts(ctx, n, k, csi)
        except grpc.RpcError as err:
            # What the finished phases measured stays in the result.
            res.error = f"CSI burst stopped: {err.code().name}: {err.details()}"
    for phase, label, bare_label in PHASES:
        b = bare[phase]
        c = csi.get(phase)
        res.rows.append(Row(f"{label} burst throughput ({n} calls, {k} in flight)",
                            c["per_s"] if c else None, "/s", b["per_s"], bare_label, TARGET))
        for q in ("p50", "p99"):
            res.rows.append(Row(f"{label} {q} in the burst", c[f"{q}_ms"] if c else None, "ms", b[f"{q}_ms"],
                                bare_label))
        res.rows.append(Row(f"{label} guest CPU per call", c["cpu_ms_per_call"] if c else None, "ms",
                            b["cpu_ms_per_call"], f"{bare_label} (bench process)"))
    retried = {phase: c["retries"] for phase, c in csi.items() if c["retries"]}
    if retried:
        res.notes.append(f"calls retried as a CSI sidecar would (DEADLINE_EXCEEDED, UNAVAILABLE, ABORTED), "
                         f"their time included: {retried}")
    res.data = {"calls": n, "in_flight": k, "bare": bare, "csi": csi or None,
                "throughput_ratio": {p: csi[p]["per_s"] / bare[p]["per_s"] for p in csi}}
    res.notes.append(f"{n} calls, {k} in flight; CSI from this host through the controller to the bench agent "
                     "(host -> guest gRPC hop included); bare lzc_* threads inside the guest on the same pool")
    return res


def _csi_bursts(ctx: Context, n: int, k: int, results: dict[str, dict[str, Any]]) -> None:
    """Fill `results` with each phase's figures as it ends, so a failure keeps what came before."""
    assert ctx.csi is not None
    csi = ctx.csi
    base = f"bench-{ctx.run_id}-burst"
    cpu = partial(_service_cpu, ctx)

    def phase(name: str, label: str, calls: Sequence[Callable[[], Any]]) -> list[Any]:
        made, burst = _csi_burst(ctx.progress, f"{n} x {label}", calls, k, cpu)
        results[name] = figures(burst)
        _say(ctx, label, n, k, results[name])
        return made

    src = csi.create_volume(f"{base}-src").volume_id
    vols: list[str] = []
    snaps: list[str] = []
    try:
        origin = csi.create_snapshot(f"{base}-origin", src).snapshot_id
        try:
            vols = [v.volume_id for v in phase("clone", "CreateVolume from snapshot", [
                partial(csi.create_volume, f"{base}-c{i}", snapshot_id=origin) for i in range(n)])]
            snaps = [s.snapshot_id for s in phase("snapshot", "CreateSnapshot", [
                partial(csi.create_snapshot, f"{base}-s{i}", v) for i, v in enumerate(vols)])]
            phase("delete_snapshot", "DeleteSnapshot", [partial(csi.delete_snapshot, s) for s in snaps])
            snaps = []
            phase("delete_volume", "DeleteVolume", [partial(csi.delete_volume, v) for v in vols])
            vols = []
        finally:
            for s in snaps:
                csi.delete_snapshot(s)
            for v in vols:
                csi.delete_volume(v)
            csi.delete_snapshot(origin)
    finally:
        csi.delete_volume(src)


def _say(ctx: Context, label: str, n: int, k: int, f: dict[str, Any]) -> None:
    retried = f", {f['retries']} retried" if f["retries"] else ""
    ctx.progress.say(f"burst: CSI {label} x {n}, {k} in flight: {f['per_s']:.1f}/s, p99 {f['p99_ms']:.0f} ms{retried}")
