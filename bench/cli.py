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
from bench.runner import run_suites
from bench.schema import validate
from bench.table import render


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zvolt-bench",
        description="Measure zvolt against bare ZFS / local I/O on the lab guest; every figure is printed next to "
        "a baseline measured in the same run.",
    )
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"{'|'.join(SUITES + EXTRA_SUITES)}|all (default all = {', '.join(SUITES)}; "
                   f"{', '.join(EXTRA_SUITES)} runs only when named)")
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
    p.add_argument("-q", "--no-progress", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = args.suites or ["all"]
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
    print(render(report), end="")
    doc = report.as_dict()
    if args.json:
        report.write_json(args.json)
    problems = validate(json.loads(json.dumps(doc)), [s.name for s in report.suites])
    for problem in problems:
        print(f"zvolt-bench: incomplete result: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
