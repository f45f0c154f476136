"""What a complete bench JSON must contain, per suite: used by the CLI's self-check and the smoke test."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

BARE_BRANCH = ("zfs_snapshot", "zfs_clone", "lzc_snapshot", "lzc_clone")
CSI_BRANCH = ("csi_snapshot", "csi_clone_snapshot", "csi_clone_volume")
FIO_KEYS = ("randread_qd1", "randwrite_qd1", "randread_qd32", "randwrite_qd32")


def _get(doc: Any, path: str) -> Any:
    cur = doc
    for part in path.split("."):
        if isinstance(cur, list):
            cur = cur[int(part)]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise KeyError(path)
    return cur


class _Checker:
    def __init__(self, doc: Any) -> None:
        self.doc = doc
        self.problems: list[str] = []

    def positive(self, path: str) -> None:
        self.number(path, lo=0.0, strict=True)

    def number(self, path: str, lo: float = 0.0, strict: bool = False) -> None:
        try:
            value = _get(self.doc, path)
        except (KeyError, IndexError, ValueError):
            self.problems.append(f"{path}: missing")
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or math.isinf(value):
            self.problems.append(f"{path}: {value!r} is not a finite number")
        elif value < lo or (strict and value == lo):
            self.problems.append(f"{path}: {value!r} is not {'>' if strict else '>='} {lo}")

    def latency(self, path: str) -> None:
        self.positive(f"{path}.p50_ms")
        self.positive(f"{path}.p95_ms")
        try:
            if _get(self.doc, f"{path}.p95_ms") < _get(self.doc, f"{path}.p50_ms"):
                self.problems.append(f"{path}: p95 below p50")
        except (KeyError, TypeError):
            pass


def validate(doc: dict[str, Any], suites: Iterable[str]) -> list[str]:
    """Problems with a report (empty list = complete and sane). CSI fields are required when a
    suite says it reached the CSI driver (data.csi true)."""
    c = _Checker(doc)
    for suite in suites:
        base = f"suites.{suite}"
        try:
            s = _get(doc, base)
        except KeyError:
            c.problems.append(f"{base}: missing")
            continue
        if s.get("error"):
            c.problems.append(f"{base}: failed: {s['error']}")
            continue
        if not s.get("rows"):
            c.problems.append(f"{base}.rows: empty")
        d = f"{base}.data"
        if suite == "branch":
            sizes = s.get("data", {}).get("sizes", [])
            if not sizes:
                c.problems.append(f"{d}.sizes: empty")
            for i, _ in enumerate(sizes):
                keys = BARE_BRANCH + (CSI_BRANCH if s["data"].get("csi") else ())
                for k in keys:
                    c.latency(f"{d}.per_size.{i}.stats.{k}")
                c.number(f"{d}.per_size.{i}.pool_objects")
            c.number(f"{d}.fill_seconds_total")
        elif suite == "scale":
            if s.get("data", {}).get("lab", "simulate" not in s.get("data", {})):
                c.positive(f"{d}.zfs_list.seconds")
                c.positive(f"{d}.zfs_list.lines")
                for k in ("zd_devices", "zvolt_subsystems", "enabled_namespaces"):
                    c.number(f"{d}.idle.{k}")
            if "published" in s.get("data", {}):
                c.latency(f"{d}.publish_at_size")
            if "restart" in s.get("data", {}):
                c.positive(f"{d}.restart.seconds")
                c.positive(f"{d}.agent_rss.rss_kib")
            if "simulate" in s.get("data", {}):
                for i, _ in enumerate(s["data"]["simulate"].get("levels", [])):
                    c.positive(f"{d}.simulate.levels.{i}.volumes")
                    c.positive(f"{d}.simulate.levels.{i}.rss_bytes_per_volume")
                    c.positive(f"{d}.simulate.levels.{i}.restart_seconds")
        elif suite == "burst":
            data = s.get("data", {})
            sides = ("bare", "csi") if data.get("csi") is not None else ("bare",)
            for side in sides:
                for phase in ("clone", "snapshot", "delete_snapshot", "delete_volume"):
                    for k in ("calls", "wall_s", "per_s", "p50_ms", "p99_ms", "cpu_ms_per_call"):
                        c.positive(f"{d}.{side}.{phase}.{k}")
        elif suite == "restore":
            data = s.get("data", {})
            levels = data.get("fake", {}).get("levels", [])
            if len(levels) < 2:
                c.problems.append(f"{d}.fake.levels: fewer than two sizes")
            for i, _ in enumerate(levels):
                for k in ("volumes", "restore_seconds", "restore_cpu_seconds", "us_per_volume", "cpu_us_per_volume",
                          "publish_cpu_ms", "republish_cpu_ms", "unpublish_cpu_ms"):
                    c.positive(f"{d}.fake.levels.{i}.{k}")
            if data.get("lab"):
                lab_levels = data.get("lab_restore", {}).get("levels", [])
                if len(lab_levels) < 2:
                    c.problems.append(f"{d}.lab_restore.levels: fewer than two sizes")
                for i, lv in enumerate(lab_levels):
                    for k in ("publish_ms", "unpublish_ms"):
                        c.positive(f"{d}.lab_restore.levels.{i}.{k}")
                    for kind in ("restart", "reboot", *(("cold",) if "cold" in lv else ())):
                        c.positive(f"{d}.lab_restore.levels.{i}.{kind}.seconds")
                        c.positive(f"{d}.lab_restore.levels.{i}.{kind}.agent_startup_seconds")
        elif suite == "datapath":
            for k in FIO_KEYS:
                for side in ("local", "nvme_tcp"):
                    c.positive(f"{d}.fio.{k}.{side}.iops")
                    c.positive(f"{d}.fio.{k}.{side}.lat_mean_us")
            for side in ("local", "nvme_tcp"):
                c.positive(f"{d}.pgbench.{side}.tps")
            for k in ("qd32_iops_randread", "qd32_iops_randwrite", "qd1_lat_randread", "qd1_lat_randwrite",
                      "pgbench_tps"):
                c.positive(f"{d}.ratios.{k}")
        elif suite == "attach":
            c.latency(f"{d}.stats.bare_stage")
            c.latency(f"{d}.stats.bare_unstage")
            if s.get("data", {}).get("csi"):
                for k in ("node_stage", "node_unstage", "publish", "unpublish"):
                    c.latency(f"{d}.stats.{k}")
        elif suite == "cluster":
            for k in ("start_1", "start_n"):
                c.positive(f"{d}.{k}.seconds")
            for op in ("create", "clone"):
                for side in ("one", "many"):
                    c.latency(f"{d}.{op}.{side}")
            for op in ("list_volumes", "list_snapshots"):
                for side in ("one", "many"):
                    for k in ("seconds", "pages", "entries", "largest_bytes", "controller_rss_after_kib"):
                        c.positive(f"{d}.{op}.{side}.{k}")
            for k in ("create_static", "create_records", "clone_records"):
                c.positive(f"{d}.silent.during.{k}.p50_ms")
            for k in ("list_first_page", "list_page_at_silent", "get_capacity"):
                c.positive(f"{d}.silent.{k}.seconds")
            for k in ("rss_kib_total", "pss_kib_total", "start_seconds"):
                c.positive(f"{d}.agents.{k}")
    return c.problems
