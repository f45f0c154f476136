"""datapath: fio 4k random I/O and pgbench on a local zvol vs the same kind of zvol over NVMe/TCP.

The export is the bench's own nvmet subsystem on its own port (written to configfs by
bench.inguest, like the lab smoke test), so this suite needs neither the agent nor the CSI driver
and measures exactly the kernel data path zvolt sets up.
"""

from __future__ import annotations

from typing import Any

from bench.results import Row, SuiteResult
from bench.suites.context import Context

PORT = 4421  # not the agent's 4420: the bench never touches the agent's port
WORKLOADS = (("randread", 1), ("randwrite", 1), ("randread", 32), ("randwrite", 32))


class RawExport:
    """A zvol exported on the bench port and connected from the worker namespace."""

    def __init__(self, ctx: Context, name: str, size: int) -> None:
        self.ctx = ctx
        self.dataset = f"{ctx.pool}/benchdp/{name}"
        self.nqn = f"nqn.2026-11.io.zvolt.bench:{ctx.run_id}-{name}"
        self.size = size
        self.local_dev = ""
        self.remote_dev = ""

    def __enter__(self) -> RawExport:
        g = self.ctx.guest
        g.call("ensure-parent", {"dataset": f"{self.ctx.pool}/benchdp"})
        self.local_dev = g.call("zvol-create", {"dataset": self.dataset, "size_bytes": self.size})["device"]
        try:
            g.call(
                "export",
                {"nqn": self.nqn, "device": self.local_dev, "address": g.lab.storage_ip, "port": PORT,
                 "port_id": PORT},
                netns="storage",
            )
            self.remote_dev = g.call("connect", self.target(), netns="worker")["device"]
        except BaseException:
            self.__exit__()
            raise
        return self

    def target(self) -> dict[str, Any]:
        return {"nqn": self.nqn, "address": self.ctx.guest.lab.storage_ip, "port": PORT}

    def __exit__(self, *exc: object) -> None:
        g = self.ctx.guest
        g.call("disconnect", {"nqn": self.nqn}, netns="worker")
        g.call("unexport", {"nqn": self.nqn, "port_id": PORT}, netns="storage")
        g.call("zfs-destroy", {"dataset": self.dataset})


def _fio(ctx: Context, dev: str, rw: str, qd: int, netns: str | None) -> dict[str, Any]:
    cfg = ctx.cfg
    args = {"device": dev, "rw": rw, "iodepth": qd, "runtime": cfg.fio_runtime_s, "size_bytes": cfg.fio_size_bytes}
    out: dict[str, Any] = ctx.guest.call("fio", args, netns=netns, timeout=ctx.cfg.fio_runtime_s * 4 + 300)
    return out


def run(ctx: Context) -> SuiteResult:
    res = SuiteResult("datapath")
    cfg = ctx.cfg
    fio: dict[str, dict[str, Any]] = {}
    with RawExport(ctx, f"fio{ctx.run_id}", 1 << 30) as ex:
        ctx.progress.say("datapath: preconditioning the fio region (sequential write)")
        # Reads of never-written blocks of a thin zvol return zeros without touching disk.
        ctx.guest.call("fio", {"device": ex.local_dev, "rw": "write", "iodepth": 16, "size_bytes": cfg.fio_size_bytes,
                               "bs": "1M", "runtime": 600})
        for i, (rw, qd) in enumerate(WORKLOADS):
            key = f"{rw}_qd{qd}"
            # Alternate which side goes first so drift on a noisy machine does not favour one side.
            order = [("local", ex.local_dev, None), ("nvme_tcp", ex.remote_dev, "worker")]
            if i % 2:
                order.reverse()
            fio[key] = {}
            for side, dev, ns in order:
                ctx.progress.say(f"datapath: fio {key} {side} ({cfg.fio_runtime_s} s)")
                fio[key][side] = _fio(ctx, dev, rw, qd, ns)
    for rw in ("randread", "randwrite"):
        q1, q32 = fio[f"{rw}_qd1"], fio[f"{rw}_qd32"]
        res.rows.append(Row(f"{rw} 4k QD1 mean latency", q1["nvme_tcp"]["lat_mean_us"], "us",
                            q1["local"]["lat_mean_us"], "local zvol", "<= 1.3x"))
        res.rows.append(Row(f"{rw} 4k QD1 p50 latency", q1["nvme_tcp"]["lat_p50_us"], "us",
                            q1["local"]["lat_p50_us"], "local zvol"))
        res.rows.append(Row(f"{rw} 4k QD32 IOPS", q32["nvme_tcp"]["iops"], "IOPS", q32["local"]["iops"], "local zvol",
                            ">= 0.9x"))
    pg: dict[str, Any] = {}
    pg_args = {"scale": cfg.pg_scale, "clients": 4, "seconds": cfg.pg_seconds}
    with RawExport(ctx, f"pgr{ctx.run_id}", 2 << 30) as remote, RawExport(ctx, f"pgl{ctx.run_id}", 2 << 30) as local:
        for side, dev, ns in (("local", local.local_dev, None), ("nvme_tcp", remote.remote_dev, "worker")):
            ctx.progress.say(f"datapath: pgbench scale {cfg.pg_scale}, {cfg.pg_seconds} s, {side}")
            pg[side] = ctx.guest.call(
                "pgbench", {**pg_args, "device": dev, "mountpoint": f"/run/zvolt-bench/pg-{side}"},
                netns=ns, timeout=1800,
            )
    res.rows.append(Row("pgbench TPS", pg["nvme_tcp"]["tps"], "tps", pg["local"]["tps"], "local zvol"))
    res.rows.append(Row("pgbench latency avg", pg["nvme_tcp"]["latency_ms"], "ms", pg["local"]["latency_ms"],
                        "local zvol"))
    res.data = {
        "fio": fio,
        "pgbench": {**pg, "scale": cfg.pg_scale, "clients": 4, "seconds": cfg.pg_seconds},
        "ratios": {
            "qd32_iops_randread": fio["randread_qd32"]["nvme_tcp"]["iops"] / fio["randread_qd32"]["local"]["iops"],
            "qd32_iops_randwrite": fio["randwrite_qd32"]["nvme_tcp"]["iops"] / fio["randwrite_qd32"]["local"]["iops"],
            "qd1_lat_randread": fio["randread_qd1"]["nvme_tcp"]["lat_mean_us"]
            / fio["randread_qd1"]["local"]["lat_mean_us"],
            "qd1_lat_randwrite": fio["randwrite_qd1"]["nvme_tcp"]["lat_mean_us"]
            / fio["randwrite_qd1"]["local"]["lat_mean_us"],
            "pgbench_tps": pg["nvme_tcp"]["tps"] / pg["local"]["tps"],
        },
        "fio_runtime_s": cfg.fio_runtime_s,
        "fio_size_bytes": cfg.fio_size_bytes,
    }
    res.notes.append("NVMe/TCP side: the bench's own nvmet export (configfs) on port 4421, host in the worker netns")
    return res
