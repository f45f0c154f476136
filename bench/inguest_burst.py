"""Bare-ZFS bursts inside the lab guest: `python -m bench.inguest_burst <command> '<json args>'`.

The baseline of the burst suite: the same number of `lzc_*` calls as the CSI burst, the same
number in flight (pyzfs's cffi calls drop the GIL, so threads really overlap in the kernel), on
the same pool. Each command prints one JSON object: per-call seconds and the burst's wall time.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from zvolt.names import check_dataset, check_id

VOLMODE_NONE = 3  # pyzfs takes index properties as numbers


def _burst(calls: Sequence[Callable[[], object]], in_flight: int) -> dict[str, Any]:
    """Run every call with `in_flight` at once: per-call seconds, in completion order, and the wall time."""
    def one(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def cpu() -> float:
        return sum(ru.ru_utime + ru.ru_stime for ru in (resource.getrusage(resource.RUSAGE_SELF),
                                                         resource.getrusage(resource.RUSAGE_CHILDREN)))

    t0, c0 = time.perf_counter(), cpu()
    with ThreadPoolExecutor(max_workers=max(1, in_flight)) as pool:
        seconds = list(pool.map(one, calls))
    return {"seconds": seconds, "wall": time.perf_counter() - t0, "cpu_s": cpu() - c0}


def cpu(a: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds so far (user + system, all threads, and the child processes it waited for) of
    each named process, found by the words of its command line, e.g. {"agent": ["-m",
    "agent.main"]}; 0 for one not running."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, words in a["match"].items():
        out[name] = 0.0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if all(w in args for w in words) and int(pid) != os.getpid():
                fields = stat.rpartition(")")[2].split()
                # utime, stime and the same of its waited-for children (the `zfs` processes it runs)
                out[name] = sum(int(f) for f in fields[11:15]) / tick
                break
    return out


def _names(parent: str, tag: str, count: int) -> list[str]:
    return [check_dataset(f"{parent}/{check_id(tag, 'tag')}-{i}") for i in range(count)]


def snapshot(a: dict[str, Any]) -> dict[str, Any]:
    """The one snapshot every clone of the burst is made from."""
    import libzfs_core as lzc

    name = a["snapshot"]
    ds, _, snap = name.partition("@")
    check_dataset(ds)
    check_id(snap, "snapshot")
    lzc.lzc_snapshot([name.encode()])
    return {}


def clones(a: dict[str, Any]) -> dict[str, Any]:
    """`count` lzc_clone of one snapshot (inactive, volmode=none like a zvolt volume)."""
    import libzfs_core as lzc  # guest only: python3-pyzfs

    origin = a["origin"]
    check_dataset(origin.partition("@")[0])
    names = _names(check_dataset(a["parent"]), a["tag"], int(a["count"]))
    props = {b"volmode": VOLMODE_NONE}
    return _burst([partial(lzc.lzc_clone, n.encode(), origin.encode(), props) for n in names],
                  int(a["in_flight"]))


def snapshots(a: dict[str, Any]) -> dict[str, Any]:
    """One lzc_snapshot of each clone made by `clones` (a snapshot per database, as a burst of
    CSI CreateSnapshot of different volumes makes)."""
    import libzfs_core as lzc

    names = _names(check_dataset(a["parent"]), a["tag"], int(a["count"]))
    snap = check_id(a["snapshot"], "snapshot")
    return _burst([partial(lzc.lzc_snapshot, [f"{n}@{snap}".encode()]) for n in names], int(a["in_flight"]))


def destroy_snapshots(a: dict[str, Any]) -> dict[str, Any]:
    import libzfs_core as lzc

    names = _names(check_dataset(a["parent"]), a["tag"], int(a["count"]))
    snap = check_id(a["snapshot"], "snapshot")
    return _burst([partial(lzc.lzc_destroy_snaps, [f"{n}@{snap}".encode()], False) for n in names],
                  int(a["in_flight"]))


def destroy_clones(a: dict[str, Any]) -> dict[str, Any]:
    import libzfs_core as lzc

    names = _names(check_dataset(a["parent"]), a["tag"], int(a["count"]))
    return _burst([partial(lzc.lzc_destroy, n.encode()) for n in names], int(a["in_flight"]))


COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "snapshot": snapshot,
    "cpu": cpu,
    "clones": clones,
    "snapshots": snapshots,
    "destroy-snapshots": destroy_snapshots,
    "destroy-clones": destroy_clones,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in COMMANDS:
        print(f"usage: python -m bench.inguest_burst {{{','.join(COMMANDS)}}} '<json>'", file=sys.stderr)
        return 2
    print(json.dumps(COMMANDS[args[0]](json.loads(args[1]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
