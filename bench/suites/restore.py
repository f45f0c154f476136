"""restore: agent start-up restore time at N published volumes, in one run (issue 13).

Two halves, one report:
- fakes (this host, `bench.restorefake`): the agent's real `Recovery.run()` on the fake backends
  restoring 100 / 1,000 / 10,000 published volumes into an empty configfs tree, plus publish /
  idempotent re-publish / unpublish at each N. The suite FAILS when the per-volume restore time at
  the largest N exceeds LINEAR_BOUND x the per-volume time at the smallest, or a publish figure
  grows that much: that is growth faster than linear, not noise. The check uses the process's CPU
  time (wall clock is printed too; on this shared machine it moves with the other guests' load).
- the lab guest (real ZFS, configfs, udev): N thin 16 MiB volumes created and published through
  the agent's gRPC API, N = 100 and 1,000; at each N the agent is restarted three ways and timed
  from process start to GetInfo ready (its own recovery clock next to it): exports still in
  configfs (a plain restart), configfs emptied as after a reboot, and configfs emptied with the
  device nodes gone as well (volmode=none, the path that sets volmode=dev again, in batches).
  The first two run twice (the faster counts), the slow third once. Publish / unpublish one at a
  time at each N. Everything is unpublished and deleted at the end.
Every ratio compares with the smallest N of the same run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from bench import restorefake
from bench.config import BenchConfig
from bench.progress import Progress
from bench.results import Row, SuiteResult
from bench.stats import summarize
from bench.suites.context import Context

# Linear growth keeps the per-volume time constant (ratio 1.0). On this shared 2-core machine a
# single figure moves by up to ~2x with other guests, the GC and the page cache; anything that
# grows with N (a scan of every export per volume) gives ~10x per decade, 100x from 100 to
# 10,000. 3x passes linear growth with noise and fails anything super-linear.
LINEAR_BOUND = 3.0
LAB_HOSTS = 4          # host NQNs the lab volumes are published to (workers)
POPULATE_CHUNK = 100   # volumes per guest call: a progress line each, well inside the call timeout
LAB_REPEATS = 2        # restarts per figure in the lab (the fastest counts), except the slow "cold" one
MODULE = "bench.inguest_restore"


# --- pure parts ---------------------------------------------------------------------------------


def _ordered(levels: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(levels, key=lambda lv: int(lv["volumes"]))


def per_volume_ratio(levels: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """(key / volumes) at the largest N over the same at the smallest N; None if not comparable."""
    ordered = [lv for lv in _ordered(levels) if lv.get(key) is not None]
    if len(ordered) < 2:
        return None
    first, last = ordered[0], ordered[-1]
    base = float(first[key]) / int(first["volumes"])
    if base <= 0:
        return None
    return (float(last[key]) / int(last["volumes"])) / base


def flat_ratio(levels: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """key at the largest N over key at the smallest N (for per-call figures that must stay flat)."""
    ordered = [lv for lv in _ordered(levels) if lv.get(key) is not None]
    if len(ordered) < 2 or float(ordered[0][key]) <= 0:
        return None
    return float(ordered[-1][key]) / float(ordered[0][key])


def marginal_per_volume(levels: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Seconds per volume added between the smallest and the largest N (start-up constants cancel)."""
    ordered = [lv for lv in _ordered(levels) if lv.get(key) is not None]
    if len(ordered) < 2:
        return None
    first, last = ordered[0], ordered[-1]
    extra = int(last["volumes"]) - int(first["volumes"])
    return None if extra <= 0 else (float(last[key]) - float(first[key])) / extra


def check_fake(fake: Mapping[str, Any], bound: float = LINEAR_BOUND) -> list[str]:
    """Why the fake figures show growth faster than linear (empty: they do not)."""
    levels = _ordered(fake.get("levels", []))
    if len(levels) < 2:
        return []
    lo, hi = int(levels[0]["volumes"]), int(levels[-1]["volumes"])
    problems: list[str] = []
    r = per_volume_ratio(levels, "restore_cpu_seconds")
    if r is not None and r > bound:
        problems.append(f"restore per volume at {hi:,} is {r:.2f}x that at {lo:,} (CPU time, bound {bound:g}x): "
                        "super-linear")
    for key, what in (("publish_cpu_ms", "publish"), ("republish_cpu_ms", "re-publish"),
                      ("unpublish_cpu_ms", "unpublish")):
        r = flat_ratio(levels, key)
        if r is not None and r > bound:
            problems.append(f"{what} at {hi:,} exports is {r:.2f}x that at {lo:,} (CPU time, bound {bound:g}x): "
                            "not O(1)")
    return problems


def fake_rows(fake: Mapping[str, Any], bound: float = LINEAR_BOUND) -> list[Row]:
    levels = _ordered(fake.get("levels", []))
    if not levels:
        return []
    first = levels[0]
    n0 = f"at {int(first['volumes']):,}"
    rows: list[Row] = []
    for lv in levels:
        n = int(lv["volumes"])
        rows.append(Row("fakes: restore (Recovery.run, empty configfs)", lv["restore_seconds"], "s", size=n))
        rows.append(Row("fakes: restore per volume, wall clock", lv["us_per_volume"], "µs", first["us_per_volume"],
                        f"per volume {n0}", "", n))
        rows.append(Row("fakes: restore per volume, CPU time", lv["cpu_us_per_volume"], "µs",
                        first["cpu_us_per_volume"], f"per volume {n0}", f"<= {bound:g}x", n))
        for key, what in (("publish", "publish p50"), ("republish", "re-publish (idempotent) p50"),
                          ("unpublish", "unpublish p50")):
            rows.append(Row(f"fakes: {what}, CPU time", lv[f"{key}_cpu_ms"], "ms", first[f"{key}_cpu_ms"], n0,
                            f"flat, <= {bound:g}x", n))
    return rows


RESTARTS = (
    ("restart", "lab: agent restart, exports still in configfs"),
    ("reboot", "lab: restore after a reboot (configfs empty)"),
    ("cold", "lab: restore, configfs empty + device nodes gone"),
)


def lab_rows(lab: Mapping[str, Any], bound: float = LINEAR_BOUND) -> list[Row]:
    levels = _ordered(lab.get("levels", []))
    rows: list[Row] = []
    if not levels:
        return rows
    first = levels[0]
    n0 = f"at {int(first['volumes']):,}"
    for lv in levels:
        n = int(lv["volumes"])
        for key, what in (("publish_ms", "publish p50 (one at a time)"), ("unpublish_ms", "unpublish p50")):
            if key in lv:
                rows.append(Row(f"lab: {what}", lv[key], "ms", first.get(key), n0, "flat", n))
        for key, what in RESTARTS:
            r = lv.get(key)
            if not r:
                continue
            rows.append(Row(f"{what}: start -> ready", r["seconds"], "s", size=n))
            rows.append(Row("  of which the agent's own recovery", r["agent_startup_seconds"], "s", size=n))
            base = first.get(key)
            rows.append(Row("  recovery per volume", r["agent_startup_seconds"] / n * 1000, "ms",
                            base["agent_startup_seconds"] / int(first["volumes"]) * 1000 if base else None,
                            f"per volume {n0}", f"<= {bound:g}x", n))
    if len(levels) > 1:
        for key, what in RESTARTS[1:]:
            series = [{"volumes": lv["volumes"], "t": lv[key]["agent_startup_seconds"]} for lv in levels if lv.get(key)]
            extra = marginal_per_volume(series, "t")
            if extra is not None and len(series) > 1:
                rows.append(Row(f"{what.removeprefix('lab: ')}: recovery per extra volume", extra * 1000, "ms",
                                series[0]["t"] / int(series[0]["volumes"]) * 1000, f"per volume {n0}",
                                f"<= {bound:g}x", int(levels[-1]["volumes"])))
    bare = lab.get("bare_volmode")
    if bare:
        each = bare["separate_seconds"] / bare["count"] * 1000
        rows.append(Row("lab: zfs set volmode=dev, one process per zvol", each, "ms"))
        rows.append(Row(f"lab: zfs set volmode=dev, one process for {bare['count']} zvols, per zvol",
                        bare["batched_seconds"] / bare["count"] * 1000, "ms", each, "one process each"))
    return rows


# --- running ------------------------------------------------------------------------------------


def run_fake(cfg: BenchConfig, progress: Progress, res: SuiteResult) -> list[str]:
    fake = restorefake.run(cfg.restore_fake_sizes, progress, samples=cfg.restore_fake_samples)
    res.data["fake"] = fake
    res.data["bound"] = LINEAR_BOUND
    res.rows.extend(fake_rows(fake))
    problems = check_fake(fake)
    res.data["fake_problems"] = problems
    return problems


def run_fake_only(cfg: BenchConfig, progress: Progress) -> SuiteResult:
    """The fake half alone (no guest): `zvolt-bench restore --fake-only`."""
    res = SuiteResult("restore")
    t0 = time.perf_counter()
    res.data["lab"] = False
    problems = run_fake(cfg, progress, res)
    if problems:
        res.error = "; ".join(problems)
    res.seconds = time.perf_counter() - t0
    return res


def run(ctx: Context) -> SuiteResult:
    res = SuiteResult("restore")
    res.data["lab"] = True
    problems = run_fake(ctx.cfg, ctx.progress, res)
    lab: dict[str, Any] = {"sizes": list(ctx.cfg.restore_sizes), "levels": []}
    res.data["lab_restore"] = lab
    try:
        _run_lab(ctx, lab)
    finally:
        res.rows.extend(lab_rows(lab))
    res.notes.append(f"fakes: {restorefake.HOSTS} host NQNs, configfs emulated on tmpfs, best of "
                     f"{res.data['fake']['repeats']} restores; lab: {LAB_HOSTS} host NQNs, 16 MiB thin volumes created "
                     "and published through the agent's gRPC API (bench agent, parent "
                     f"{ctx.pool}/{ctx.cfg.fill_parent}); start -> ready timed inside the guest")
    if problems:
        res.error = "; ".join(problems)
    return res


def _call(ctx: Context, command: str, args: dict[str, Any], timeout: float) -> Any:
    """Run a `bench.inguest_restore` command in the guest; its one JSON line is the result."""
    return ctx.guest.call(command, args, timeout=timeout, module=MODULE)


def _run_lab(ctx: Context, lab: dict[str, Any]) -> None:
    agent = ctx.agent
    if agent is None or not agent.ensure():
        raise RuntimeError(f"no agent in the lab guest: {agent.unavailable if agent else 'none'}")
    from lab.guest import SOCKETS

    hosts = restorefake.host_nqns(LAB_HOSTS)
    prefix = f"bench-{ctx.run_id}-r"
    common = {"socket": SOCKETS["agent"], "prefix": prefix, "hosts": hosts}
    restart = {**agent.restart_args(), "node": ctx.cfg.node, "parent": agent.parent, "prefix": prefix}
    made = 0
    try:
        for n in sorted(ctx.cfg.restore_sizes):
            level: dict[str, Any] = {"volumes": n}
            t0 = time.perf_counter()
            create: list[float] = []
            publish: list[float] = []
            retries: list[str] = []
            while made < n:
                count = min(POPULATE_CHUNK, n - made)
                start, made = made, made + count  # counted before the call: a failed chunk is torn down too
                out = _call(ctx, "populate", {**common, "start": start, "count": count, "workers": 4},
                            timeout=600 + 20 * count)
                create += out["create_s"]
                publish += out["publish_s"]
                retries += out["publish_retries"]
                for line in out["publish_retries"]:
                    ctx.progress.say(f"restore (lab): PublishVolume failed once and was retried: {line}")
                ctx.progress.say(f"restore (lab): {made:,}/{n:,} volumes created and published "
                                 f"({time.perf_counter() - t0:.0f} s)")
            if create:
                level["populate"] = {"seconds": time.perf_counter() - t0, "create": summarize(create).as_dict(),
                                     "publish_4_at_once": summarize(publish).as_dict(), "publish_retries": retries}
            ops = _call(ctx, "ops", {**common, "host": hosts[0], "count": ctx.cfg.restore_samples}, timeout=1800)
            for key in ("publish", "republish", "unpublish"):
                level[f"{key}_ms"] = summarize(ops[f"{key}_s"]).p50_ms
            ctx.progress.say(f"restore (lab): at {n:,} exports publish p50 {level['publish_ms']:.0f} ms, "
                             f"unpublish p50 {level['unpublish_ms']:.0f} ms")
            kinds: list[tuple[str, dict[str, Any]]] = [("restart", {}), ("reboot", {"clear": True})]
            if ctx.cfg.restore_cold:
                kinds.append(("cold", {"clear": True, "devices_off": True, "count": n}))
            for key, extra in kinds:
                # The cheap restarts run twice, the fastest counts (as on the fakes: the least
                # disturbed by the other guests); the slow one with the device nodes gone once.
                runs = []
                for _ in range(1 if key == "cold" else LAB_REPEATS):
                    ctx.progress.say(f"restore (lab): {n:,} exports, agent {key} ...")
                    out = _call(ctx, "restart", {**restart, **extra}, timeout=agent.restart_args()["timeout"] + 3600)
                    if min(int(out["exports"]), int(out["linked"])) < n:
                        raise RuntimeError(f"agent {key} at {n:,} published volumes: {out['exports']} exports in "
                                           f"its index, {out['linked']} subsystems linked to a port in configfs")
                    runs.append(out)
                    ctx.progress.say(f"restore (lab): {n:,} exports, agent {key}: start -> ready "
                                     f"{out['seconds']:.1f} s (its own recovery {out['agent_startup_seconds']:.2f} s)")
                level[key] = {**min(runs, key=lambda r: float(r["agent_startup_seconds"])),
                              "runs": [{k: r[k] for k in ("seconds", "agent_startup_seconds")} for r in runs]}
            lab["levels"].append(level)
        ctx.progress.say("restore (lab): bare zfs set volmode=dev, one process each vs one for all")
        lab["bare_volmode"] = _call(ctx, "bare-volmode", {"parent": f"{ctx.pool}/benchrestore", "count": 10},
                                    timeout=1800)
    finally:
        _teardown(ctx, common, restart, made)


def _teardown(ctx: Context, common: dict[str, Any], restart: dict[str, Any], made: int) -> None:
    """Unpublish and delete every bench volume through the agent; if that fails, empty configfs
    with the agent stopped, so that destroying the bench parent never meets an enabled namespace."""
    t0 = time.perf_counter()
    try:
        done = 0
        while done < made:
            count = min(POPULATE_CHUNK * 2, made - done)
            _call(ctx, "teardown", {**common, "start": done, "count": count, "workers": 4}, timeout=600 + 20 * count)
            done += count
            ctx.progress.say(f"restore (lab): {done:,}/{made:,} volumes unpublished and deleted "
                             f"({time.perf_counter() - t0:.0f} s)")
        left = _call(ctx, "exports", {"node": restart["node"]}, timeout=300)["subsystems"]
        if left:
            raise RuntimeError(f"{left} of this node's subsystems are still in configfs after the teardown")
    except Exception as e:
        # The agent stays stopped: restarted, it would export what its index still has published,
        # and the bench parent is destroyed at the end of the run (BenchAgent.restore): never while
        # one of its zvols is still an enabled namespace (lab.md).
        ctx.progress.say(f"restore (lab): teardown through the agent failed ({e}); stopping it and emptying configfs")
        _call(ctx, "clear", {"stop_argv": restart["stop_argv"], "node": restart["node"]}, timeout=1800)
        raise
