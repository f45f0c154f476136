"""branch: snapshot and clone latency through CSI controller → agent, next to bare ZFS, per pool size."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from bench.csiclient import timed
from bench.results import Row, SuiteResult
from bench.stats import growth, summarize
from bench.suites.context import Context

TARGET = "<= 1.2x, flat"


def _csi_samples(ctx: Context, size: int, source_id: str) -> dict[str, list[float]]:
    """CreateSnapshot, clone-from-snapshot and clone-from-volume via CSI; deletes what it made."""
    assert ctx.csi is not None
    csi = ctx.csi
    out: dict[str, list[float]] = {"csi_snapshot": [], "csi_clone_snapshot": [], "csi_clone_volume": []}
    snaps: list[str] = []
    vols: list[str] = []
    try:
        for i in range(ctx.cfg.samples):
            base = f"bench-{ctx.run_id}-n{size}-{i}"
            snap, dt = timed(partial(csi.create_snapshot, f"{base}-snap", source_id))
            out["csi_snapshot"].append(dt)
            snaps.append(snap.snapshot_id)
            vol, dt = timed(partial(csi.create_volume, f"{base}-cs", snapshot_id=snap.snapshot_id))
            out["csi_clone_snapshot"].append(dt)
            vols.append(vol.volume_id)
            vol, dt = timed(partial(csi.create_volume, f"{base}-cv", volume_id=source_id))
            out["csi_clone_volume"].append(dt)
            vols.append(vol.volume_id)
    finally:
        # Volumes first: the design lets snapshots with clones be deleted in any order, but
        # deleting clones first keeps the pool clean for the next size without deferred work.
        for v in vols:
            csi.delete_volume(v)
        for s in snaps:
            csi.delete_snapshot(s)
    return out


# (sample key, label, bare-ZFS sample keys its baseline sums, baseline label)
CSI_FIGURES = (
    ("csi_snapshot", "CreateSnapshot", ("zfs_snapshot",), "zfs snapshot"),
    ("csi_clone_snapshot", "clone from snapshot", ("zfs_clone",), "zfs clone"),
    ("csi_clone_volume", "clone from volume", ("zfs_snapshot", "zfs_clone"), "zfs snapshot+clone"),
)


def size_summary(objects: int, stats: dict[str, dict[str, float]]) -> str:
    """One progress line per pool size: each CSI figure's p50 next to its bare-ZFS baseline."""
    parts = [f"zfs snapshot {stats['zfs_snapshot']['p50_ms']:.0f} ms, zfs clone {stats['zfs_clone']['p50_ms']:.0f} ms"]
    for key, label, bkeys, _ in CSI_FIGURES:
        if key in stats:
            p50 = stats[key]["p50_ms"]
            base = sum(stats[b]["p50_ms"] for b in bkeys)
            parts.append(f"{label} {p50:.0f} ms ({p50 / base:.2f}x)" if base else f"{label} {p50:.0f} ms")
    return f"branch at {objects:,} objects, p50: " + "; ".join(parts)


def run(ctx: Context) -> SuiteResult:
    res = SuiteResult("branch")
    pool = ctx.pool
    bare_parent = f"{pool}/benchbranch"
    ctx.guest.call("ensure-parent", {"dataset": bare_parent})
    bare_src = f"{bare_parent}/src"
    ctx.guest.call("zvol-create", {"dataset": bare_src, "size_bytes": 1 << 30, "volmode": "none"})
    csi_src = ""
    if ctx.csi is not None:
        csi_src = ctx.csi.create_volume(f"bench-{ctx.run_id}-branch-src").volume_id
    else:
        res.notes.append("CSI controller not reachable: only bare ZFS baselines measured")
    per_size: list[dict[str, Any]] = []
    try:
        for size in ctx.cfg.sizes:
            fill = ctx.fill_to(size)
            ctx.progress.say(f"branch: pool at {ctx.fill.objects:,} objects, measuring {ctx.cfg.samples} samples")
            tag = f"b{ctx.run_id}n{size}"
            # Alternate bare and CSI halves so a noisy neighbour hits both sides alike.
            samples: dict[str, list[float]] = {}
            half = max(1, ctx.cfg.samples // 2)
            for rnd in range(2):
                bare = ctx.guest.call(
                    "zfs-branch",
                    {"source": bare_src, "clone_parent": bare_parent, "count": half, "tag": f"{tag}r{rnd}"},
                    timeout=600,
                )["samples"]
                for k, v in bare.items():
                    samples.setdefault(k, []).extend(v)
            if csi_src and ctx.csi is not None:
                for k, v in _csi_samples(ctx, size, csi_src).items():
                    samples[k] = v
                # The floor of the CSI path: a Probe over the same host -> guest gRPC hop (no agent, no ZFS).
                samples["csi_probe"] = [timed(ctx.csi.probe)[1] for _ in range(ctx.cfg.samples)]
            stats = {k: summarize(v).as_dict() for k, v in samples.items()}
            entry: dict[str, Any] = {"size": size, "pool_objects": ctx.fill.objects, "fill": fill, "stats": stats}
            per_size.append(entry)
            # Said at once: a run that dies later (hours at 100,000 objects) still leaves these in its log.
            ctx.progress.say(size_summary(ctx.fill.objects, stats))
            zs, zc = stats["zfs_snapshot"]["p50_ms"], stats["zfs_clone"]["p50_ms"]
            lzs = stats["lzc_snapshot"]["p50_ms"]
            res.rows.append(Row("zfs snapshot p50", zs, "ms", lzs, "lzc_snapshot", size=size))
            res.rows.append(Row("zfs clone p50", zc, "ms", stats["lzc_clone"]["p50_ms"], "lzc_clone", size=size))
            if csi_src:
                res.rows.append(Row("CSI Probe p50 (transport floor)", stats["csi_probe"]["p50_ms"], "ms", size=size))
                for key, label, bkeys, blabel in CSI_FIGURES:
                    for q in ("p50", "p95"):
                        base = sum(stats[b][f"{q}_ms"] for b in bkeys)
                        target = TARGET if q == "p50" else ""
                        res.rows.append(Row(f"{label} {q}", stats[key][f"{q}_ms"], "ms", base, blabel, target, size))
            ctx.save_partial(SuiteResult("branch", rows=list(res.rows),
                                         data={"per_size": list(per_size), "fill_steps": list(ctx.fill.steps)}))
    finally:
        if csi_src and ctx.csi is not None:
            ctx.csi.delete_volume(csi_src)
        ctx.guest.call("zfs-destroy", {"dataset": bare_src, "recursive": True})
    sizes = [e["size"] for e in per_size]
    slopes: dict[str, Any] = {}
    for key in ("zfs_snapshot", "zfs_clone", "lzc_snapshot", "lzc_clone", "csi_snapshot", "csi_clone_snapshot",
                "csi_clone_volume"):
        if all(key in e["stats"] for e in per_size):
            slopes[key] = growth(sizes, [e["stats"][key]["p50_ms"] for e in per_size])
    ratios = []
    for e in per_size:
        st = e["stats"]
        r: dict[str, Any] = {"size": e["size"]}
        if "csi_snapshot" in st:
            r["snapshot"] = st["csi_snapshot"]["p50_ms"] / st["zfs_snapshot"]["p50_ms"]
            r["clone_snapshot"] = st["csi_clone_snapshot"]["p50_ms"] / st["zfs_clone"]["p50_ms"]
            r["clone_volume"] = st["csi_clone_volume"]["p50_ms"] / (
                st["zfs_snapshot"]["p50_ms"] + st["zfs_clone"]["p50_ms"]
            )
        ratios.append(r)
    for key, g in slopes.items():
        res.rows.append(Row(f"{key} growth per 10x objects", g["per_decade"], "x", target="~1.0 (flat)"))
    res.data = {
        "sizes": sizes,
        "per_size": per_size,
        "ratios": ratios,
        "slopes": slopes,
        "fill_seconds_total": ctx.fill.seconds,
        "csi": bool(csi_src),
        "measured_at": time.time(),
    }
    res.notes.append(
        f"pool filled with {ctx.fill.objects:,} volumes+snapshots under {ctx.fill_parent} in {ctx.fill.seconds:.0f} s "
        f"(created this run: {ctx.fill.created_volumes:,} volumes, {ctx.fill.created_snapshots:,} snapshots)"
    )
    return res
