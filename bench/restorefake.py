"""restore, fake mode: the agent's start-up export restore at N published volumes, on this host.

For each N, a node on the fake backends holds N published volumes: FakeZfs has the N zvols with
volmode=dev (as publishing leaves them) and the index has them published, each to one of
`HOSTS` host NQNs (a handful of workers, as on a real cluster). Then, `repeats` times, a fresh
agent (`agent.fakes.make_node(recover=False)`: new Exports, an empty emulated configfs tree, as
after a reboot) runs its whole `Recovery.run()` (layout, intents, export restore, link, gc) and
is timed; the best of the repeats counts (the one least disturbed by whatever else the shared
machine runs). Then publish, idempotent re-publish and unpublish of a fresh volume are timed
`samples` times at that N (median): they must not grow with the number of other exports.

Every figure is taken twice: wall clock, and the CPU time of this process (user + system, so the
configfs writes count). On a shared machine the wall clock of a 5 s restore moves by 2-4x with the
other guests' load while the CPU time does not (seen here: 1,000 volumes 543 us/volume on a calm
machine, 1,504 with three TCG guests busy, CPU time flat): the growth check uses the CPU time.
Nothing on the fake backends waits (device nodes are there at once), so CPU time is all the work.

The emulated configfs and the index live on tmpfs (/dev/shm) when there is one: configfs is in
memory, and a disk-backed temp dir adds the host's file system noise (3-8x slower here) to a
figure that is about the agent's own work.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
import uuid
from typing import Any

from bench.progress import Progress

HOSTS = 8
SIZE = 16 << 20
POOL = "tank"
PARENT = "tank/zvolt"


def host_nqns(count: int = HOSTS) -> list[str]:
    """Host NQNs as nvme-cli makes them (uuid form), one per simulated worker."""
    return [f"nqn.2014-08.org.nvmexpress:uuid:{uuid.UUID(int=i + 1)}" for i in range(count)]


def _vid(i: int) -> str:
    return f"r{i:07d}"


def _tmp_base() -> str | None:
    shm = "/dev/shm"  # a private mkdtemp below it, never a fixed name
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def build(n: int, state_dir: str, zfs: Any = None) -> Any:
    """FakeZfs (or the one given) + index holding `n` published volumes. Returns the FakeZfs."""
    from agent.fakes import FakeZfs
    from agent.index import Index, VolumeRec
    from agent.records import hosts_value

    zfs = FakeZfs() if zfs is None else zfs
    for ds in (POOL, PARENT, f"{PARENT}/v", f"{PARENT}/trash"):
        zfs.create_filesystem(ds)
    hosts = host_nqns()
    index = Index(state_dir)
    try:
        index.set_meta("parent", PARENT)  # a known index: start-up must not rebuild it from ZFS
        with index.tx() as tx:
            for i in range(n):
                vid = _vid(i)
                ds = f"{PARENT}/v/{vid}"
                host = [hosts[i % len(hosts)]]
                zfs.create_volume(ds, SIZE, {"volmode": "dev", "zvolt:id": vid, "zvolt:hosts": hosts_value(host)})
                tx.put_volume(VolumeRec(id=vid, name=f"pvc-{i:07d}", dataset=ds, size=SIZE, volblocksize=16384,
                                        compression="lz4", thick=False, hosts=host, created=0))
    finally:
        index.close()
    zfs.settle()  # no zvol is "just created" (busy in udev) any more
    return zfs


def restore_once(zfs: Any, state_dir: str, configfs: str) -> dict[str, Any]:
    """A fresh agent over `zfs` and the index, empty configfs: time its whole start-up recovery."""
    from agent.fakes import make_node

    node = make_node(state_dir, configfs, zfs=zfs, recover=False)
    try:
        calls = len(zfs.calls)
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        node.recovery.run()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not node.readiness.ready:
            raise RuntimeError(f"fake agent not ready: {node.readiness.reason}")
        restored = len(node.volumes.exports.exported_ids())
        zfs_sets = sum(1 for c in zfs.calls[calls:] if c.startswith("set "))
    finally:
        node.index.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "restored": restored, "zfs_sets": zfs_sets}


def ops_at(zfs: Any, state_dir: str, configfs: str, samples: int) -> dict[str, list[float]]:
    """Publish / re-publish / unpublish of fresh volumes on a node whose N exports are restored."""
    from agent.fakes import make_node
    from agent.volumes import VolumeSpec

    node = make_node(state_dir, configfs, zfs=zfs, recover=True)
    host = host_nqns()[0]
    out: dict[str, list[float]] = {k: [] for op in ("publish", "republish", "unpublish") for k in (op, f"{op}_cpu")}
    try:
        v = node.volumes
        for k in range(samples):
            rec = v.create_volume(VolumeSpec(name=f"bench-ops-{k}", size=SIZE))
            for key, fn in (("publish", v.publish), ("republish", v.publish), ("unpublish", v.unpublish)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn(rec.id, host)
                out[key].append(time.perf_counter() - t0)
                out[f"{key}_cpu"].append(time.process_time() - c0)
            zfs.settle()
            v.delete_volume(rec.id)
    finally:
        node.index.close()
    return out


def measure(n: int, repeats: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="zvolt-bench-restore-", dir=_tmp_base()) as tmp:
        state = os.path.join(tmp, "state")
        t0 = time.perf_counter()
        zfs = build(n, state)
        build_s = time.perf_counter() - t0
        runs = [restore_once(zfs, state, tempfile.mkdtemp(prefix="configfs-", dir=tmp)) for _ in range(repeats)]
        for r in runs:
            if r["restored"] != n:
                raise RuntimeError(f"fake restore exported {r['restored']} of {n} published volumes")
        ops = ops_at(zfs, state, tempfile.mkdtemp(prefix="configfs-", dir=tmp), samples)
    best = min(r["seconds"] for r in runs)
    best_cpu = min(r["cpu_seconds"] for r in runs)
    level: dict[str, Any] = {
        "volumes": n,
        "hosts": HOSTS,
        "build_seconds": build_s,
        "restore_seconds": best,
        "restore_cpu_seconds": best_cpu,
        "restore_runs": [r["seconds"] for r in runs],
        "restore_cpu_runs": [r["cpu_seconds"] for r in runs],
        "us_per_volume": best / n * 1e6,
        "cpu_us_per_volume": best_cpu / n * 1e6,
        "zfs_sets": runs[0]["zfs_sets"],
    }
    for key, values in ops.items():  # publish_ms, publish_cpu_ms, ...
        level[f"{key}_ms"] = statistics.median(values) * 1000
    return level


def run(sizes: tuple[int, ...], progress: Progress, repeats: int = 3, samples: int = 30) -> dict[str, Any]:
    result: dict[str, Any] = {
        "what": "fresh agent on fakes (agent.fakes.make_node), empty emulated configfs: Recovery.run() restoring N "
                f"published volumes ({HOSTS} host NQNs), best of {repeats}; publish/re-publish/unpublish medians of "
                f"{samples}",
        "repeats": repeats, "samples": samples, "levels": [],
    }
    for n in sorted(sizes):
        progress.say(f"restore (fakes): {n:,} published volumes")
        level = measure(n, repeats, samples)
        result["levels"].append(level)
        progress.say(f"restore (fakes): {n:,} volumes restored in {level['restore_seconds']:.3f} s "
                     f"({level['us_per_volume']:.0f} µs per volume, CPU {level['cpu_us_per_volume']:.0f} µs); "
                     f"publish {level['publish_ms']:.2f} ms (CPU {level['publish_cpu_ms']:.2f}), unpublish "
                     f"{level['unpublish_ms']:.2f} ms (CPU {level['unpublish_cpu_ms']:.2f})")
    return result
