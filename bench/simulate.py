"""scale --simulate N: agent restart at up to 1,000,000 volumes on the fake backends, no guest.

The index is filled in bulk (large transactions of the agent's own `Index`/`Tx` records, as if
N CreateVolume calls had committed). Then a *fresh interpreter* builds the agent on fakes
(`agent.fakes.make_node`: FakeZfs, emulated configfs tree, the real Index/Volumes/Exports/
Recovery) and runs its start-up recovery: index load, intents, export restore of the published
volumes. FakeZfs holds only the pool's parents and the published volumes, so a recovery that
touched any other dataset (a listing that grows with the pool) would fail, not pass silently.
A fresh process is what a restart is, and it keeps the bulk fill's memory out of the RSS figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.progress import Progress
from bench.results import Row

PUBLISHED = 300          # "a few hundred published" (issue 7)
SNAPS_PER_VOLUME = 1
TX_ROWS = 20_000


def levels(limit: int, quick: bool) -> list[int]:
    """Decades from 1,000 (10,000 in full runs) up to `limit`, always ending at `limit`."""
    out: list[int] = []
    n = 1_000 if quick else 10_000
    while n < limit:
        out.append(n)
        n *= 10
    out.append(limit)
    return out


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


POOL = "tank"
PARENT = "tank/zvolt"


def _vid(i: int) -> str:
    return f"v{i:08d}"


def populate(state_dir: str, start: int, stop: int, parent: str = PARENT) -> float:
    """Add volumes [start, stop) with one snapshot each; the first PUBLISHED are published."""
    from agent.index import Index, SnapshotRec, VolumeRec

    t0 = time.perf_counter()
    index = Index(state_dir)
    try:
        # Without this the agent would take the index for a fresh one and rebuild it from ZFS.
        index.set_meta("parent", parent)
        now = int(time.time())
        for lo in range(start, stop, TX_ROWS):
            with index.tx() as tx:
                for i in range(lo, min(stop, lo + TX_ROWS)):
                    vid = _vid(i)
                    ds = f"{parent}/v/{vid}"
                    hosts = [f"nqn.2014-08.org.nvmexpress:uuid:{i:032x}"] if i < PUBLISHED else []
                    tx.put_volume(VolumeRec(id=vid, name=f"pvc-{i:08d}", dataset=ds, size=1 << 30,
                                            volblocksize=16384, compression="lz4", thick=False, hosts=hosts,
                                            created=now))
                    for j in range(SNAPS_PER_VOLUME):
                        tx.put_snapshot(SnapshotRec(id=f"{vid}@s{j}", name=f"snap-{i:08d}-{j}", volume_id=vid,
                                                    dataset=f"{ds}@s{j}", size=1 << 30, created=now))
    finally:
        index.close()
    return time.perf_counter() - t0


def restart_child(state_dir: str) -> dict[str, Any]:
    """An agent restart on fakes over the filled index (run in a fresh interpreter by `measure`)."""
    from agent.fakes import FakeZfs, make_node  # imported before the baseline: code is not per-volume cost

    zfs = FakeZfs()
    for ds in (POOL, PARENT, f"{PARENT}/v", f"{PARENT}/trash"):
        zfs.create_filesystem(ds)
    for i in range(PUBLISHED):
        zfs.create_volume(f"{PARENT}/v/{_vid(i)}", 1 << 30, {"volmode": "dev"})
    zfs.settle()
    with tempfile.TemporaryDirectory(prefix="zvolt-bench-configfs-") as configfs:
        base = _rss_kib()
        t0 = time.perf_counter()
        node = make_node(state_dir, configfs, zfs=zfs, recover=True)
        seconds = time.perf_counter() - t0
        after = _rss_kib()
        if not node.readiness.ready:
            raise RuntimeError(f"simulated agent not ready: {node.readiness.reason}")
        volumes, snapshots, published = node.index.counts()
        exported = len(node.volumes.exports.exported_ids())
        node.index.close()
    return {
        "seconds": seconds,
        "startup_seconds": node.readiness.startup_seconds,
        "rss_base_kib": base,
        "rss_after_kib": after,
        "volumes": volumes,
        "snapshots": snapshots,
        "published": published,
        "restored": exported,
    }


def measure(state_dir: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.simulate", "restart", state_dir],
        capture_output=True, text=True, timeout=3600, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"simulated restart failed: {proc.stderr.strip()[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run(limit: int, progress: Progress, quick: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"limit": limit, "published": PUBLISHED, "snapshots_per_volume": SNAPS_PER_VOLUME,
                              "levels": [], "what": "fresh process: agent.fakes.make_node + Recovery.run (index "
                              "load, intents, export restore into an emulated configfs) over N indexed volumes"}
    with tempfile.TemporaryDirectory(prefix="zvolt-bench-sim-") as tmp:
        done = 0
        for n in levels(limit, quick):
            progress.say(f"simulate: filling index to {n:,} volumes")
            fill_s = populate(tmp, done, n)
            done = n
            m = measure(tmp)
            grown = max(0, m["rss_after_kib"] - m["rss_base_kib"]) * 1024
            db = sum(p.stat().st_size for p in Path(tmp).iterdir())
            level = {
                "volumes": m["volumes"],
                "snapshots": m["snapshots"],
                "fill_seconds": fill_s,
                "restart_seconds": m["seconds"],
                "agent_startup_seconds": m["startup_seconds"],
                "exports_restored": m["restored"],
                "rss_kib": m["rss_after_kib"],
                "rss_growth_bytes": grown,
                # Whole RSS of the restarted process over its volumes: includes the interpreter, so it
                # only falls below the target at large N; the marginal figure is the per-volume cost.
                "rss_bytes_per_volume": m["rss_after_kib"] * 1024 / max(1, m["volumes"]),
                "rss_growth_bytes_per_volume": grown / max(1, m["volumes"]),
                "index_bytes_on_disk": db,
            }
            if result["levels"]:
                prev = result["levels"][-1]
                level["rss_marginal_bytes_per_volume"] = (level["rss_kib"] - prev["rss_kib"]) * 1024 / max(
                    1, level["volumes"] - prev["volumes"])
            result["levels"].append(level)
            progress.say(f"simulate: {n:,} volumes: restart {m['seconds'] * 1000:.0f} ms, RSS {m['rss_after_kib']} KiB")
    return result


def rows(sim: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for lv in sim["levels"]:
        n = int(lv["volumes"])
        out.append(Row("sim restart to ready", lv["restart_seconds"] * 1000, "ms", size=n))
        out.append(Row("sim RSS per volume (whole process)", lv["rss_bytes_per_volume"], "B", size=n))
        if "rss_marginal_bytes_per_volume" in lv:
            out.append(Row("sim RSS per extra volume (marginal)", lv["rss_marginal_bytes_per_volume"], "B",
                           target="<= 1024 B", size=n))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "restart" or not os.path.isdir(args[1]):
        print("usage: python -m bench.simulate restart STATE_DIR", file=sys.stderr)
        return 2
    print(json.dumps(restart_child(args[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
