"""Bench helpers that run *inside* the lab guest: `python -m bench.inguest <command> '<json args>'`.

Timing loops run here, next to the kernel, so a bare `zfs snapshot` is not charged the host→guest
ssh round trip. This module is the bench's only adapter to ZFS, configfs, nvme-cli, fio, mkfs,
mount and postgres: it validates every name and builds every argv (never a shell string). Each
command prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from zvolt.names import check_dataset, check_id, check_nqn

NVMET = Path("/sys/kernel/config/nvmet")
VOLMODE = {"default": 0, "geom": 1, "dev": 2, "none": 3}  # pyzfs takes index properties as numbers
_DEV = re.compile(r"^/dev/(zd[0-9]+|nvme[0-9]+n[0-9]+|zvol/[A-Za-z0-9_./:-]+)$")
_IP = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")


def _run(
    argv: Sequence[str], timeout: float = 300, check: bool = True, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed (rc {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def _timed(fn: Callable[..., object], *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _device(path: str) -> str:
    if not _DEV.fullmatch(path) or ".." in path:
        raise ValueError(f"not a device path the bench uses: {path!r}")
    return path


def _settle() -> None:
    _run(["udevadm", "settle", "--timeout=30"], check=False)


def _destroy(name: str, recursive: bool = False) -> None:
    """zfs destroy with the udev-busy retry lab.md describes (a fresh zvol is briefly open by blkid)."""
    check_dataset(name.split("@")[0])
    argv = ["zfs", "destroy", *(["-r"] if recursive else []), name]
    for attempt in range(10):
        proc = _run(argv, check=False, timeout=7200 if recursive else 300)
        if proc.returncode == 0 or "does not exist" in proc.stderr:
            return
        if "busy" not in proc.stderr or attempt == 9:
            raise RuntimeError(f"zfs destroy {name} failed: {proc.stderr.strip()}")
        _settle()
        time.sleep(0.2)


def _exists(name: str) -> bool:
    return _run(["zfs", "list", "-H", "-o", "name", name], check=False).returncode == 0


def ensure_parent(a: dict[str, Any]) -> dict[str, Any]:
    """Create a plain filesystem dataset (and its parents) for bench objects; volmode=none for children."""
    name = check_dataset(a["dataset"])
    if not _exists(name):
        _run(["zfs", "create", "-p", "-o", "volmode=none", name])
    return {"dataset": name}


def zvol_create(a: dict[str, Any]) -> dict[str, Any]:
    name = check_dataset(a["dataset"])
    volmode = a.get("volmode", "dev")
    if volmode not in VOLMODE:
        raise ValueError(f"volmode {volmode!r}")
    if not _exists(name):
        _run(["zfs", "create", "-s", "-V", str(int(a["size_bytes"])), "-o", f"volmode={volmode}",
              "-o", f"volblocksize={int(a.get('volblocksize', 16384))}", name])
    dev = f"/dev/zvol/{name}"
    if volmode == "dev":
        deadline = time.monotonic() + 30
        while not os.path.exists(dev):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dev} did not appear")
            _settle()
    return {"dataset": name, "device": os.path.realpath(dev) if volmode == "dev" else ""}


def zfs_destroy(a: dict[str, Any]) -> dict[str, Any]:
    _destroy(a["dataset"], recursive=bool(a.get("recursive", False)))
    return {}


def zfs_branch(a: dict[str, Any]) -> dict[str, Any]:
    """Bare ZFS baselines on one source zvol: CLI snapshot, CLI clone, lzc snapshot, lzc clone.

    The source is an inactive (volmode=none) sparse zvol like a zvolt volume; clones get
    volmode=none too (a clone does not inherit volmode from its origin). Everything made here
    is destroyed again before returning.
    """
    import libzfs_core as lzc  # guest only: python3-pyzfs

    src = check_dataset(a["source"])
    parent = check_dataset(a["clone_parent"])
    count = int(a["count"])
    tag = check_id(a["tag"], "tag")
    out: dict[str, list[float]] = {"zfs_snapshot": [], "zfs_clone": [], "lzc_snapshot": [], "lzc_clone": []}
    snaps: list[str] = []
    clones: list[str] = []
    try:
        for i in range(count):
            s_cli = f"{src}@{tag}c{i}"
            out["zfs_snapshot"].append(_timed(_run, ["zfs", "snapshot", s_cli]))
            snaps.append(s_cli)
            c_cli = f"{parent}/{tag}c{i}"
            out["zfs_clone"].append(_timed(_run, ["zfs", "clone", "-o", "volmode=none", s_cli, c_cli]))
            clones.append(c_cli)
            s_lzc = f"{src}@{tag}l{i}"
            out["lzc_snapshot"].append(_timed(lzc.lzc_snapshot, [s_lzc.encode()]))
            snaps.append(s_lzc)
            c_lzc = f"{parent}/{tag}l{i}"
            inactive = {b"volmode": VOLMODE["none"]}
            out["lzc_clone"].append(_timed(lzc.lzc_clone, c_lzc.encode(), s_lzc.encode(), inactive))
            clones.append(c_lzc)
    finally:
        for c in clones:
            _destroy(c)
        if snaps:
            lzc.lzc_destroy_snaps([s.encode() for s in snaps], False)
    return {"samples": out}


def zfs_create(a: dict[str, Any]) -> dict[str, Any]:
    """Bare create baselines: `zfs create -s -V` (CLI) and lzc_create, inactive sparse zvols, destroyed after."""
    import libzfs_core as lzc

    parent = check_dataset(a["parent"])
    tag = check_id(a["tag"], "tag")
    size = int(a.get("size_bytes", 1 << 30))
    out: dict[str, list[float]] = {"zfs_create": [], "lzc_create": []}
    made: list[str] = []
    try:
        for i in range(int(a["count"])):
            cli = f"{parent}/{tag}c{i}"
            out["zfs_create"].append(_timed(_run, ["zfs", "create", "-s", "-V", str(size), "-o", "volmode=none", cli]))
            made.append(cli)
            lz = f"{parent}/{tag}l{i}"
            props = {b"volsize": size, b"volblocksize": 16384, b"volmode": VOLMODE["none"]}
            out["lzc_create"].append(_timed(partial(lzc.lzc_create, lz.encode(), ds_type="zvol", props=props)))
            made.append(lz)
    finally:
        for n in made:
            _destroy(n)
    return {"samples": out}


def agent_volume_props(vid: str, size: int, created: str) -> dict[str, str]:
    """The user properties the agent writes on a volume it creates (agent/volumes.py create_volume),
    which its index rebuild (agent/records.py from_props) reads back."""
    return {"zvolt:id": vid, "zvolt:name": f"bench-fill-{vid}", "zvolt:created": created, "zvolt:thick": "0",
            "zvolt:hosts": "-", "zvolt:size": str(size)}


def agent_snapshot_props(vid: str, n: int, created: str) -> dict[str, str]:
    return {"zvolt:name": f"bench-fill-{vid}-s{n}", "zvolt:volume": vid, "zvolt:created": created}


def fill(a: dict[str, Any]) -> dict[str, Any]:
    """Add inactive sparse zvols, each with `snaps` snapshots, numbered from `start`.

    There is no batch create, and with the agent's properties every snapshot carries its own
    names, so each object is one ioctl. Each ioctl waits for its txg to sync, and concurrent
    sync tasks share a txg: `workers` threads (pyzfs's cffi calls drop the GIL) fill several
    times faster than one. Without agent properties, a batch of snapshots is one lzc_snapshot
    call (one txg, lab.md: ~20x cheaper per snapshot). `props` are extra user properties.
    """
    import libzfs_core as lzc

    parent = check_dataset(a["parent"])
    start, count, snaps = int(a["start"]), int(a["count"]), int(a.get("snaps", 1))
    batch = int(a.get("batch", 100))
    workers = max(1, int(a.get("workers", 32)))
    size = int(a.get("size_bytes", 1 << 30))
    agent = bool(a.get("agent_props", False))
    now = str(int(time.time()))
    t0 = time.perf_counter()

    def one_volume(i: int) -> tuple[int, int]:
        """Create volume i (and, with agent properties, its snapshots): (volumes, snapshots) made."""
        vid = check_id(f"f{i:07d}")
        name = check_dataset(f"{parent}/{vid}")
        made = snapped = 0
        if not lzc.lzc_exists(name.encode()):
            props: dict[bytes, Any] = {b"volsize": size, b"volblocksize": 16384, b"volmode": VOLMODE["none"]}
            if agent:
                props.update({k.encode(): v.encode() for k, v in agent_volume_props(vid, size, now).items()})
            lzc.lzc_create(name.encode(), ds_type="zvol", props=props)
            made = 1
        if agent:
            for j in range(snaps):
                snap = f"{name}@s{j}".encode()
                if not lzc.lzc_exists(snap):
                    sprops = {k.encode(): v.encode() for k, v in agent_snapshot_props(vid, j, now).items()}
                    lzc.lzc_snapshot([snap], sprops)
                    snapped += 1
        return made, snapped

    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(one_volume, range(start, start + count)))
    created = sum(v for v, _ in done)
    snapped = sum(s for _, s in done)
    if not agent:
        names = [f"{parent}/f{i:07d}@s{j}".encode() for i in range(start, start + count) for j in range(snaps)]
        for k in range(0, len(names), batch):
            todo = [s for s in names[k:k + batch] if not lzc.lzc_exists(s)]
            if todo:
                lzc.lzc_snapshot(todo)
                snapped += len(todo)
    # Objects already present (a reused pool disk) count as filled; `created_*` says what this call made.
    return {
        "volumes": count,
        "snapshots": count * snaps,
        "created_volumes": created,
        "created_snapshots": snapped,
        "seconds": time.perf_counter() - t0,
    }


def zfs_list(a: dict[str, Any]) -> dict[str, Any]:
    """One full `zfs list -r` of a dataset tree (volumes and snapshots): the baseline for restart."""
    root = check_dataset(a["dataset"])
    t0 = time.perf_counter()
    proc = _run(["zfs", "list", "-H", "-p", "-t", "all", "-o", "name,volsize,used", "-r", root], timeout=7200)
    return {"seconds": time.perf_counter() - t0, "lines": len(proc.stdout.splitlines())}


def idle_cost(a: dict[str, Any]) -> dict[str, Any]:
    """Kernel objects that exist right now: zvol device nodes and nvmet subsystems/namespaces."""
    zd = [p for p in os.listdir("/dev") if re.fullmatch(r"zd[0-9]+", p)]
    subs = sorted(os.listdir(NVMET / "subsystems")) if (NVMET / "subsystems").is_dir() else []
    prefix = str(a.get("nqn_prefix", "nqn.2026-11.io.zvolt:"))
    ours = [s for s in subs if s.startswith(prefix)]
    enabled = 0
    for s in ours:
        ns_dir = NVMET / "subsystems" / s / "namespaces"
        for ns in os.listdir(ns_dir) if ns_dir.is_dir() else []:
            enabled += (ns_dir / ns / "enable").read_text().strip() == "1"
    return {
        "zd_devices": len(zd),
        "subsystems": len(subs),
        "zvolt_subsystems": len(ours),
        "enabled_namespaces": enabled,
    }


def rss(a: dict[str, Any]) -> dict[str, Any]:
    """VmRSS of the process whose command line contains all of `match` (e.g. ["-m", "agent.main"])."""
    want = [str(m) for m in a["match"]]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [x.decode(errors="replace") for x in argv]
        if all(w in args for w in want) and int(pid) != os.getpid():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return {"pid": int(pid), "rss_kib": int(line.split()[1])}
    return {"pid": 0, "rss_kib": 0}


def agent_restart(a: dict[str, Any]) -> dict[str, Any]:
    """Restart the agent unit and time, from here in the guest, until GetInfo says ready.

    Measured next to the kernel (no ssh or harness polling in the figure): from launching the new
    process (interpreter start, imports, index load, intents, export restore) to the first ready
    answer on its unix socket, polled every 10 ms.
    """
    import grpc

    from zvolt.pb import agent_pb2, agent_pb2_grpc

    stop, start = [str(x) for x in a["stop_argv"]], [str(x) for x in a["start_argv"]]
    if stop[:1] != ["systemctl"] or start[:1] != ["systemd-run"]:
        raise ValueError("agent-restart takes a systemctl stop and a systemd-run command line")
    sock = a["socket"]
    if not re.fullmatch(r"/run/zvolt/[a-z-]+\.sock", sock):
        raise ValueError(f"socket {sock!r}")
    _run(stop, check=False, timeout=120)
    unit = stop[-1]
    deadline = time.monotonic() + 60
    while _run(["systemctl", "is-active", unit], check=False).stdout.strip() in ("active", "deactivating"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{unit} did not stop")
        time.sleep(0.1)
    _run(["systemctl", "reset-failed", unit], check=False)
    t0 = time.monotonic()
    _run(start, timeout=120)
    limit = t0 + float(a.get("timeout", 3600))
    ch = grpc.insecure_channel(f"unix://{sock}")
    try:
        while True:
            try:
                info = agent_pb2_grpc.AgentStub(ch).GetInfo(agent_pb2.GetInfoRequest(), timeout=5)
                if info.ready:
                    break
            except grpc.RpcError:
                # Not listening yet: a fresh channel, or gRPC's reconnect backoff (up to seconds)
                # would be counted as start-up time.
                ch.close()
                ch = grpc.insecure_channel(f"unix://{sock}")
            if time.monotonic() > limit:
                raise RuntimeError("agent did not become ready")
            time.sleep(0.01)
    finally:
        ch.close()
    return {
        "seconds": time.monotonic() - t0,
        "agent_startup_seconds": float(info.startup_seconds),
        "volumes": int(info.volumes),
        "snapshots": int(info.snapshots),
        "exports": int(info.exports),
    }


# --- raw nvmet export (the bench's own subsystem and port, never the agent's) -------------------


def export(a: dict[str, Any]) -> dict[str, Any]:
    """Export a device as namespace 1 of a new subsystem on the bench's own TCP port.

    Must run in the storage namespace: nvmet's listener lives in the netns of the process that
    links the subsystem into the port.
    """
    nqn = check_nqn(a["nqn"])
    dev = _device(a["device"])
    ip = a["address"]
    if not _IP.fullmatch(ip):
        raise ValueError(f"address {ip!r}")
    port_id = str(int(a["port_id"]))
    svc = str(int(a["port"]))
    sub = NVMET / "subsystems" / nqn
    sub.mkdir(exist_ok=True)
    (sub / "attr_allow_any_host").write_text("1")
    ns = sub / "namespaces" / "1"
    ns.mkdir(exist_ok=True)
    if (ns / "enable").read_text().strip() != "1":
        (ns / "device_path").write_text(dev)
        (ns / "enable").write_text("1")
    port = NVMET / "ports" / port_id
    if not port.is_dir():
        port.mkdir()
        (port / "addr_trtype").write_text("tcp")
        (port / "addr_adrfam").write_text("ipv4")
        (port / "addr_traddr").write_text(ip)
        (port / "addr_trsvcid").write_text(svc)
    link = port / "subsystems" / nqn
    if not link.is_symlink():
        link.symlink_to(sub)
    return {"nqn": nqn, "port_id": port_id}


def unexport(a: dict[str, Any]) -> dict[str, Any]:
    """Tear down in the order lab.md requires: port link, namespace disable, rmdir ns, subsystem."""
    nqn = check_nqn(a["nqn"])
    port = NVMET / "ports" / str(int(a["port_id"]))
    link = port / "subsystems" / nqn
    if link.is_symlink():
        link.unlink()
    sub = NVMET / "subsystems" / nqn
    ns = sub / "namespaces" / "1"
    if ns.is_dir():
        (ns / "enable").write_text("0")
        ns.rmdir()
    if sub.is_dir():
        sub.rmdir()
    if port.is_dir() and not any((port / "subsystems").iterdir()):
        port.rmdir()
    return {}


BENCH_NQN_PREFIX = "nqn.2026-11.io.zvolt.bench:"


def teardown_hosts(a: dict[str, Any]) -> dict[str, Any]:
    """Disconnect every bench controller (run in the worker namespace) after a failed run."""
    base = Path("/sys/class/nvme-subsystem")
    done = []
    for subsys in base.iterdir() if base.is_dir() else []:
        try:
            nqn = (subsys / "subsysnqn").read_text().strip()
        except OSError:
            continue
        if nqn.startswith(BENCH_NQN_PREFIX):
            _run(["nvme", "disconnect", "-n", check_nqn(nqn)], check=False)
            done.append(nqn)
    return {"disconnected": done}


def teardown_exports(a: dict[str, Any]) -> dict[str, Any]:
    """Remove every bench subsystem and the bench port (storage namespace), in the safe order."""
    port_id = int(a["port_id"])
    subs = NVMET / "subsystems"
    done = []
    for nqn in sorted(os.listdir(subs)) if subs.is_dir() else []:
        if nqn.startswith(BENCH_NQN_PREFIX):
            unexport({"nqn": nqn, "port_id": port_id})
            done.append(nqn)
    return {"removed": done}


def _find_nvme_device(nqn: str, base: Path = Path("/sys/class/nvme-subsystem")) -> str:
    """The block device of namespace 1 of `nqn`, found by subsystem NQN in sysfs (never guessed)."""
    for subsys in base.iterdir() if base.is_dir() else []:
        try:
            if (subsys / "subsysnqn").read_text().strip() != nqn:
                continue
        except OSError:
            continue
        heads = sorted(p.name for p in subsys.iterdir() if re.fullmatch(r"nvme[0-9]+n[0-9]+", p.name))
        if heads:
            return f"/dev/{heads[0]}"
        for ctrl in subsys.iterdir():
            if re.fullmatch(r"nvme[0-9]+", ctrl.name):
                nss = sorted(p.name for p in ctrl.iterdir() if re.fullmatch(r"nvme[0-9]+(c[0-9]+)?n[0-9]+", p.name))
                if nss:
                    return f"/dev/{re.sub(r'c[0-9]+', '', nss[0])}"
    return ""


def _connect(nqn: str, ip: str, port: int, timeout: float = 30) -> str:
    _run(["nvme", "connect", "-t", "tcp", "-a", ip, "-s", str(port), "-n", nqn])
    deadline = time.monotonic() + timeout
    while True:
        dev = _find_nvme_device(nqn)
        if dev and os.path.exists(dev):
            return dev
        if time.monotonic() > deadline:
            raise RuntimeError(f"no block device for {nqn} after connect")
        time.sleep(0.01)


def connect(a: dict[str, Any]) -> dict[str, Any]:
    nqn = check_nqn(a["nqn"])
    dev = _find_nvme_device(nqn) or _connect(nqn, a["address"], int(a["port"]))
    return {"device": dev}


def disconnect(a: dict[str, Any]) -> dict[str, Any]:
    nqn = check_nqn(a["nqn"])
    _run(["nvme", "disconnect", "-n", nqn], check=False)
    return {}


def fio(a: dict[str, Any]) -> dict[str, Any]:
    """One fio job (4k random I/O, direct, libaio) on a device; returns IOPS and completion latency."""
    dev = _device(a["device"])
    rw = a["rw"]
    if rw not in ("randread", "randwrite", "write"):
        raise ValueError(f"rw {rw!r}")
    argv = [
        "fio", "--name=bench", f"--filename={dev}", f"--rw={rw}", f"--bs={a.get('bs', '4k')}",
        "--direct=1", "--ioengine=libaio", f"--iodepth={int(a['iodepth'])}", f"--size={int(a['size_bytes'])}",
        "--output-format=json", "--group_reporting",
    ]
    if rw != "write":
        argv += ["--time_based", f"--runtime={int(a['runtime'])}", "--randrepeat=0", "--norandommap"]
    proc = _run(argv, timeout=float(a.get("runtime", 60)) * 4 + 300)
    return parse_fio(proc.stdout, "read" if rw == "randread" else "write")


def parse_fio(stdout: str, direction: str) -> dict[str, float]:
    """IOPS and completion latency (us) of the first job in fio's JSON output (which may follow warnings)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError("no JSON in fio output")
    job = json.loads(stdout[start:])["jobs"][0]
    side = job[direction]
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    return {
        "iops": float(side["iops"]),
        "lat_mean_us": float(clat.get("mean", 0.0)) / 1000.0,
        "lat_p50_us": float(pct.get("50.000000", 0.0)) / 1000.0,
        "lat_p99_us": float(pct.get("99.000000", 0.0)) / 1000.0,
        "seconds": float(job.get("job_runtime", 0)) / 1000.0,
    }


def attach_bare(a: dict[str, Any]) -> dict[str, Any]:
    """The bare kernel steps NodeStage performs, timed: connect, device found, mkfs.ext4, mount; then
    umount + disconnect. The baseline for the node plugin's NodeStage/NodeUnstage.
    """
    nqn = check_nqn(a["nqn"])
    mnt = Path(a["mountpoint"])
    if not str(mnt).startswith("/run/zvolt-bench/"):
        raise ValueError(f"mountpoint {mnt} outside /run/zvolt-bench")
    stage: list[float] = []
    unstage: list[float] = []
    for _ in range(int(a["count"])):
        mnt.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        dev = _connect(nqn, a["address"], int(a["port"]))
        # -E nodiscard: mkfs on a fresh device each time, like NodeStage of a new volume.
        _run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
        _run(["mount", dev, str(mnt)])
        stage.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        _run(["umount", str(mnt)])
        _run(["nvme", "disconnect", "-n", nqn])
        unstage.append(time.perf_counter() - t1)
    return {"stage": stage, "unstage": unstage}


def parse_pgbench(stdout: str) -> dict[str, float]:
    tps = re.search(r"^tps = ([0-9.]+)", stdout, re.MULTILINE)
    if tps is None:
        raise ValueError(f"no tps line in pgbench output: {stdout[-500:]!r}")
    lat = re.search(r"^latency average = ([0-9.]+) ms", stdout, re.MULTILINE)
    return {"tps": float(tps.group(1)), "latency_ms": float(lat.group(1)) if lat else 0.0}


def pgbench(a: dict[str, Any]) -> dict[str, Any]:
    """mkfs + initdb + pgbench on a device, as the postgres user; everything is torn down after."""
    dev = _device(a["device"])
    mnt = Path(a["mountpoint"])
    if not str(mnt).startswith("/run/zvolt-bench/"):
        raise ValueError(f"mountpoint {mnt} outside /run/zvolt-bench")
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    port = str(int(a.get("pg_port", 5499)))
    data, sock = mnt / "data", mnt / "sock"
    runas = ["runuser", "-u", "postgres", "--"]
    mnt.mkdir(parents=True, exist_ok=True)
    _run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
    _run(["mount", dev, str(mnt)])
    started = False
    try:
        for d in (data, sock):
            d.mkdir()
            shutil.chown(d, "postgres", "postgres")
        # cwd: runuser keeps root's cwd, which postgres may not enter.
        _run([*runas, str(bindir / "initdb"), "-D", str(data), "--no-sync", "-A", "trust", "-U", "postgres"],
             cwd="/tmp")
        _run([*runas, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(sock / "pg.log"), "-o",
              f"-k {sock} -p {port} -c listen_addresses='' -c shared_buffers=32MB", "start"], timeout=300, cwd="/tmp")
        started = True
        conn = ["-h", str(sock), "-p", port, "-U", "postgres"]
        t0 = time.perf_counter()
        _run([*runas, str(bindir / "pgbench"), *conn, "-i", "-q", "-s", str(int(a["scale"])), "postgres"],
             timeout=1800, cwd="/tmp")
        init_s = time.perf_counter() - t0
        proc = _run([*runas, str(bindir / "pgbench"), *conn, "-c", str(int(a["clients"])), "-j", "2",
                     "-T", str(int(a["seconds"])), "-n", "postgres"], timeout=int(a["seconds"]) * 3 + 120, cwd="/tmp")
        return {**parse_pgbench(proc.stdout), "init_seconds": init_s}
    finally:
        if started:
            _run([*runas, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], check=False, cwd="/tmp")
        _run(["umount", str(mnt)], check=False)


COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ensure-parent": ensure_parent,
    "zvol-create": zvol_create,
    "zfs-destroy": zfs_destroy,
    "zfs-branch": zfs_branch,
    "zfs-create": zfs_create,
    "fill": fill,
    "zfs-list": zfs_list,
    "idle-cost": idle_cost,
    "rss": rss,
    "agent-restart": agent_restart,
    "export": export,
    "unexport": unexport,
    "teardown-hosts": teardown_hosts,
    "teardown-exports": teardown_exports,
    "connect": connect,
    "disconnect": disconnect,
    "fio": fio,
    "attach-bare": attach_bare,
    "pgbench": pgbench,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in COMMANDS:
        print(f"usage: python -m bench.inguest {{{','.join(COMMANDS)}}} '<json>'", file=sys.stderr)
        return 2
    result = COMMANDS[args[0]](json.loads(args[1]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
