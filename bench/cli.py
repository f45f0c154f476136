"""zvolt-bench: one command for the branch, scale, datapath and attach suites (or all)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.config import EXTRA_SUITES, SUITES, make_config, parse_sizes
from bench.progress import Progress
from bench.results import Report
from bench.runner import run_suites
from bench.schema import validate
from bench.suites import cluster
from bench.table import render

CLUSTER = "cluster"


def _cluster_config(args: argparse.Namespace) -> cluster.ClusterConfig:
    base = cluster.ClusterConfig.quick() if args.quick else cluster.ClusterConfig()
    cfg = dataclasses.replace(base, agents=args.cluster_agents or base.agents,
                              volumes=args.cluster_volumes or base.volumes, per_process=args.agents_per_process,
                              samples=args.samples or base.samples)
    if cfg.agents < 2 or cfg.volumes < 1 or cfg.per_process < 1 or cfg.samples < 2:
        raise SystemExit("zvolt-bench: cluster needs at least 2 agents, 1 volume, 1 agent per process, 2 samples")
    return cfg


def _run_cluster_only(cfg: cluster.ClusterConfig, args: argparse.Namespace) -> int:
    """`zvolt-bench cluster`: no lab guest."""
    report = Report(quick=args.quick)
    progress = Progress(enabled=not args.no_progress)
    progress.say("suite cluster: start (this host, agents on fakes; no guest)")
    report.suites.append(cluster.run(cfg, progress))
    return _finish(report, args)


def _finish(report: Report, args: argparse.Namespace) -> int:
    print(render(report), end="")
    if args.json:
        report.write_json(args.json)
    problems = validate(json.loads(json.dumps(report.as_dict())), [s.name for s in report.suites])
    for problem in problems:
        print(f"zvolt-bench: incomplete result: {problem}", file=sys.stderr)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zvolt-bench",
        description="Measure zvolt against bare ZFS / local I/O on the lab guest; every figure is printed next to "
        "a baseline measured in the same run.",
    )
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"{'|'.join(SUITES + EXTRA_SUITES)}|cluster|all (default all = {', '.join(SUITES)}; "
                   f"{', '.join(EXTRA_SUITES)} and cluster run only when named; cluster needs no guest)")
    p.add_argument("--quick", action="store_true", help="small sizes and short runs (a few minutes on a warm lab)")
    p.add_argument("--json", type=Path, help="also write the full results to this JSON file")
    p.add_argument("--sizes", type=parse_sizes, help="pool sizes (volumes+snapshots) for branch/scale, e.g. 100,1000")
    p.add_argument("--simulate", type=int, default=0, metavar="N",
                   help="scale: also run the in-process simulation on the fake backends up to N volumes")
    p.add_argument("--simulate-only", action="store_true", help="run only the simulation (no lab guest needed)")
    p.add_argument("--lab-name", default=os.environ.get("ZVOLT_LAB_NAME", "bench"),
                   help="lab instance to boot or reuse (default: bench, so other engineers' guests are untouched)")
    p.add_argument("--pool-disk", type=Path, help="boot the guest with this cached pool disk image (big pools)")
    p.add_argument("--samples", type=int, help="latency samples per operation (default 5 quick, 20 full)")
    p.add_argument("--keep-fill", action="store_true",
                   help="keep the filler volumes/snapshots in the pool (reuse them with a cached pool disk)")
    p.add_argument("--snaps-per-volume", type=int, default=1, metavar="N",
                   help="pool mix: each filler volume gets N snapshots (default 1; more fills big pools faster)")
    p.add_argument("--restore-sizes", type=parse_sizes, metavar="N,N",
                   help="restore: published volumes in the lab guest (default 100,1000)")
    p.add_argument("--fake-sizes", type=parse_sizes, metavar="N,N",
                   help="restore: published volumes on the fake backends (default 100,1000,10000)")
    p.add_argument("--fake-only", action="store_true", help="restore: only the fake half, on this host (no guest)")
    p.add_argument("--no-cold", action="store_true",
                   help="restore: skip the lab restart with the device nodes gone (volmode=none first; slowest part)")
    p.add_argument("--published", type=int, metavar="N",
                   help="scale: filler volumes published during the agent restart (default 200; --quick 3)")
    p.add_argument("--cluster-agents", type=int, metavar="N", help="cluster: storage nodes (default 100; --quick 10)")
    p.add_argument("--cluster-volumes", type=int, metavar="N",
                   help="cluster: volumes (+ as many snapshots) per storage node (default 10,000; --quick 1,000)")
    p.add_argument("--agents-per-process", type=int, default=1, metavar="K",
                   help="cluster: agent identities served by one process, each on its own socket (default 1)")
    p.add_argument("--burst-calls", type=int, metavar="N", help="burst: calls per burst (default 1,000; --quick 24)")
    p.add_argument("--burst-in-flight", type=int, metavar="K", help="burst: calls at once (default 32; --quick 8)")
    p.add_argument("-q", "--no-progress", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = args.suites or ["all"]
    # cluster runs on this host alone (agents on fakes), only when named.
    cluster_cfg = _cluster_config(args) if CLUSTER in chosen else None
    chosen = [s for s in chosen if s != CLUSTER]
    if cluster_cfg is not None and not chosen:
        return _run_cluster_only(cluster_cfg, args)
    suites = tuple(SUITES) if "all" in chosen else tuple(dict.fromkeys(chosen))
    if args.simulate_only and not args.simulate:
        args.simulate = 100_000 if not args.quick else 10_000
    try:
        cfg = make_config(suites, args.quick, args.sizes, args.simulate, args.simulate_only, args.keep_fill,
                          restore_sizes=args.restore_sizes, fake_sizes=args.fake_sizes, fake_only=args.fake_only,
                          restore_cold=not args.no_cold)
        if args.samples:
            if args.samples < 2:
                raise ValueError("--samples must be at least 2")
            cfg = dataclasses.replace(cfg, samples=args.samples, attach_samples=args.samples,
                                      restore_samples=args.samples)
        if args.snaps_per_volume < 0:
            raise ValueError("--snaps-per-volume must not be negative")
        cfg = dataclasses.replace(cfg, snaps_per_volume=args.snaps_per_volume)
        if args.published is not None:
            if args.published < 0:
                raise ValueError("--published must not be negative")
            cfg = dataclasses.replace(cfg, published=args.published)
        if (args.burst_calls is not None and args.burst_calls < 2) or (
                args.burst_in_flight is not None and args.burst_in_flight < 1):
            raise ValueError("--burst-calls must be at least 2 and --burst-in-flight at least 1")
        cfg = dataclasses.replace(cfg, burst_count=args.burst_calls or cfg.burst_count,
                                  burst_in_flight=args.burst_in_flight or cfg.burst_in_flight)
    except ValueError as e:
        print(f"zvolt-bench: {e}", file=sys.stderr)
        return 2
    progress = Progress(enabled=not args.no_progress)
    lab = None
    if not (cfg.simulate_only or cfg.fake_only):
        from bench.labconn import open_lab

        progress.say(f"lab: booting or reusing instance {args.lab_name!r}")
        lab = open_lab(args.lab_name, args.pool_disk)
    report = run_suites(cfg, lab, progress, json_path=args.json)
    if cluster_cfg is not None:
        progress.say("suite cluster: start")
        report.suites.append(cluster.run(cluster_cfg, progress))
    return _finish(report, args)


if __name__ == "__main__":
    raise SystemExit(main())
