"""Smoke: `zvolt-bench --quick` completes on the lab guest and its JSON has every suite's fields.

No performance thresholds here (they are for people, in bench/README.md); this asserts that every
suite ran against the real kernel stack, produced sane numbers, and left nothing behind.
"""

import json
from pathlib import Path
from typing import Any

import pytest

from bench.config import SUITES, make_config
from bench.progress import Progress
from bench.runner import run_suites
from bench.schema import validate

ROOT = Path(__file__).resolve().parents[2]


def _kernel_objects(lab: Any) -> tuple[int, set[str]]:
    devs = lab.run(["ls", "/dev"]).stdout.split()
    subs = lab.run(["ls", "/sys/kernel/config/nvmet/subsystems"], check=False).stdout.split()
    return sum(1 for d in devs if d.startswith("zd") and d[2:].isdigit()), {s for s in subs if ".bench:" in s}


# slow (12 minutes under TCG, the longest test of the lab): kept out of the default run so that it
# fits CI's 90 minutes even when the lab image has to be built first; `pytest tests/lab -m slow`.
@pytest.mark.lab
@pytest.mark.slow
def test_bench_quick_runs_every_suite(lab: Any, tmp_path: Path) -> None:
    zd_before, _ = _kernel_objects(lab)
    zvolt_subs_before = len(lab.run(["ls", "/sys/kernel/config/nvmet/subsystems"], check=False).stdout.split())
    cfg = make_config(SUITES, quick=True, sizes=None)
    report = run_suites(cfg, lab, Progress())
    out = tmp_path / "bench.json"
    report.write_json(out)
    doc = json.loads(out.read_text())
    assert sorted(doc["suites"]) == sorted(SUITES)
    assert validate(doc, SUITES) == []

    branch = doc["suites"]["branch"]["data"]
    assert branch["sizes"] == list(cfg.sizes)
    for entry in branch["per_size"]:
        assert entry["pool_objects"] >= entry["size"]
        assert entry["stats"]["zfs_snapshot"]["n"] == cfg.samples // 2 * 2
    if (ROOT / "csi" / "main.py").exists() and (ROOT / "agent" / "main.py").exists():
        # Once the driver exists the bench must measure through it, not silently fall back.
        assert branch["csi"] is True, f"bench measured without CSI: {doc['suites']['scale'].get('notes')}"
        assert doc["suites"]["attach"]["data"]["csi"] is True
    scale = doc["suites"]["scale"]["data"]
    assert scale["zfs_list"]["lines"] >= cfg.max_size  # the listing really saw the filled pool
    # Filler volumes are inactive (volmode=none): they must not have produced device nodes.
    assert scale["idle"]["zd_devices"] <= zd_before + scale.get("restart", {}).get("exports", 0)
    # A few fillers were published over CSI: the restart restored exactly those, and nothing idle got a device.
    assert scale["published"] == cfg.published and scale["restart"]["exports"] >= cfg.published
    assert scale["idle_devices"] <= zd_before and scale["idle_subsystems"] <= zvolt_subs_before
    fio = doc["suites"]["datapath"]["data"]["fio"]
    assert fio["randread_qd32"]["local"]["iops"] > fio["randread_qd1"]["local"]["iops"] * 0.5

    zd_after, bench_subs = _kernel_objects(lab)
    assert bench_subs == set(), "the bench left its nvmet subsystems behind"
    assert zd_after <= zd_before, "the bench left zvol device nodes behind"
    datasets = lab.run(["zfs", "list", "-H", "-o", "name", "-d", "1", lab.pool]).stdout.split()
    assert not [d for d in datasets if d.split("/")[-1].startswith("bench")], "bench datasets left behind"
