"""zvolt-bench restore: the linearity check, the table, the fake half end to end, and the batched
`zfs set volmode=dev` the agent's start-up restore uses (adapter argv, recovery, fallback)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent import nvmet
from agent.fakes import FakeZfs, make_node
from agent.zfs import BatchProps, LibZfs, ZfsError, set_props_many
from bench import inguest_restore, restorefake
from bench.cli import main
from bench.config import make_config
from bench.progress import Progress
from bench.results import Report, SuiteResult
from bench.schema import validate
from bench.suites import restore
from bench.table import render
from zvolt import names
from zvolt.errors import ZvoltError


def _fake_levels(cpu_seconds: Mapping[int, float], publish_ms: Mapping[int, float] | None = None,
                 wall_factor: float = 1.5) -> dict[str, Any]:
    """Fake-half results with these CPU times (wall clock = CPU x wall_factor)."""
    levels = []
    for n, cpu in cpu_seconds.items():
        pub = (publish_ms or {}).get(n, 1.0)
        levels.append({"volumes": n, "restore_seconds": cpu * wall_factor, "restore_cpu_seconds": cpu,
                       "us_per_volume": cpu * wall_factor / n * 1e6, "cpu_us_per_volume": cpu / n * 1e6,
                       "publish_ms": pub * wall_factor, "republish_ms": 0.3, "unpublish_ms": 0.5,
                       "publish_cpu_ms": pub, "republish_cpu_ms": 0.2, "unpublish_cpu_ms": 0.4})
    return {"levels": levels, "repeats": 3, "samples": 30}


# --- the linearity check ------------------------------------------------------------------------


def test_linear_growth_passes_even_with_noise() -> None:
    # 500 µs per volume at 100, 1,000 and 10,000 (with 2x noise in the middle): linear.
    fake = _fake_levels({10_000: 5.0, 100: 0.05, 1_000: 1.0})
    assert restore.per_volume_ratio(fake["levels"], "restore_cpu_seconds") == pytest.approx(1.0)
    assert restore.check_fake(fake) == []


def test_the_check_uses_cpu_time_not_the_wall_clock() -> None:
    # Other guests made the 10,000 run's wall clock 4x slower; the agent's own work did not grow.
    fake = _fake_levels({100: 0.05, 10_000: 5.0})
    fake["levels"][1]["restore_seconds"] *= 4
    fake["levels"][1]["us_per_volume"] *= 4
    assert restore.check_fake(fake) == []


def test_quadratic_restore_fails() -> None:
    # Each volume scans every other export: per-volume time grows 100x from 100 to 10,000.
    fake = _fake_levels({100: 0.05, 1_000: 5.0, 10_000: 500.0})
    problems = restore.check_fake(fake)
    assert len(problems) == 1 and "super-linear" in problems[0] and "100.00x" in problems[0]


def test_bound_is_the_largest_over_the_smallest() -> None:
    just_under = _fake_levels({100: 0.1, 10_000: 0.1 * 100 * 2.99})
    just_over = _fake_levels({100: 0.1, 10_000: 0.1 * 100 * 3.01})
    assert restore.check_fake(just_under) == []
    assert restore.check_fake(just_over)
    assert restore.check_fake(just_over, bound=4.0) == []


def test_publish_that_grows_with_exports_fails() -> None:
    fake = _fake_levels({100: 0.05, 10_000: 5.0}, publish_ms={100: 0.5, 10_000: 8.0})
    problems = restore.check_fake(fake)
    assert problems == ["publish at 10,000 exports is 16.00x that at 100 (CPU time, bound 3x): not O(1)"]


def test_one_size_cannot_be_checked() -> None:
    assert restore.per_volume_ratio([{"volumes": 100, "t": 1.0}], "t") is None
    assert restore.flat_ratio([], "t") is None
    assert restore.check_fake({"levels": []}) == []


def test_marginal_per_volume_cancels_start_up_constants() -> None:
    # 10 s of start-up plus 20 ms per volume.
    levels = [{"volumes": n, "t": 10.0 + 0.02 * n} for n in (100, 1000)]
    assert restore.marginal_per_volume(levels, "t") == pytest.approx(0.02)
    assert restore.marginal_per_volume(levels[:1], "t") is None


# --- the table ----------------------------------------------------------------------------------


def test_fake_rows_print_per_volume_ratios_against_the_smallest_size() -> None:
    fake = _fake_levels({100: 0.05, 1_000: 0.6, 10_000: 4.0})
    res = SuiteResult("restore", rows=restore.fake_rows(fake))
    text = render(Report(quick=False, suites=[res]))
    lines = [ln for ln in text.splitlines() if "fakes: restore per volume, CPU time" in ln]
    assert len(lines) == 3
    assert lines[0].split()[0] == "100" and "500" in lines[0] and "1.00x" in lines[0]
    assert lines[1].split()[0] == "1,000" and "600" in lines[1] and "1.20x" in lines[1]
    assert lines[2].split()[0] == "10,000" and "400" in lines[2] and "0.80x" in lines[2]
    assert all("µs" in ln and "per volume at 100" in ln and "<= 3x" in ln for ln in lines)
    wall = [ln for ln in text.splitlines() if "fakes: restore per volume, wall clock" in ln]
    assert "750" in wall[0] and "1.00x" in wall[0] and "900" in wall[1] and "1.20x" in wall[1]
    assert sum("fakes: publish p50, CPU time" in ln for ln in text.splitlines()) == 3
    assert sum("fakes: unpublish p50, CPU time" in ln for ln in text.splitlines()) == 3


def _restart(seconds: float, own: float, n: int) -> dict[str, Any]:
    return {"seconds": seconds, "agent_startup_seconds": own, "exports": n, "linked": n, "volumes": n, "snapshots": 0}


def test_lab_rows() -> None:
    lab = {"levels": [
        {"volumes": 100, "publish_ms": 900.0, "unpublish_ms": 700.0, "restart": _restart(15.0, 1.0, 100),
         "reboot": _restart(20.0, 5.0, 100), "cold": _restart(80.0, 60.0, 100)},
        {"volumes": 1000, "publish_ms": 950.0, "unpublish_ms": 650.0, "restart": _restart(25.0, 8.0, 1000),
         "reboot": _restart(60.0, 41.0, 1000), "cold": _restart(700.0, 600.0, 1000)},
    ], "bare_volmode": {"count": 10, "separate_seconds": 6.0, "batched_seconds": 3.0}}
    rows = restore.lab_rows(lab)
    by = {(r.metric, r.size): r for r in rows}
    per_vol = [r for r in rows if r.metric == "  recovery per volume" and r.size == 1000]
    assert [round(r.ratio or 0, 2) for r in per_vol] == [0.8, 0.82, 1.0]  # restart, reboot, cold
    extra = by[("restore after a reboot (configfs empty): recovery per extra volume", 1000)]
    assert extra.value == pytest.approx((41.0 - 5.0) / 900 * 1000)
    assert extra.baseline == pytest.approx(50.0)
    assert by[("lab: publish p50 (one at a time)", 1000)].ratio == pytest.approx(950 / 900)
    batched = by[("lab: zfs set volmode=dev, one process for 10 zvols, per zvol", None)]
    assert batched.value == pytest.approx(300.0) and batched.ratio == pytest.approx(0.5)
    assert restore.lab_rows({"levels": []}) == []


def test_schema_wants_both_halves_when_the_lab_ran() -> None:
    fake = _fake_levels({100: 0.05, 1_000: 0.5})
    rows = [r.__dict__ for r in restore.fake_rows(fake)]
    doc: dict[str, Any] = {"suites": {"restore": {"error": "", "rows": rows, "data": {"lab": False, "fake": fake}}}}
    assert validate(doc, ["restore"]) == []
    doc["suites"]["restore"]["data"]["lab"] = True
    assert any("lab_restore.levels" in p for p in validate(doc, ["restore"]))
    doc["suites"]["restore"]["data"]["fake"]["levels"][0]["restore_cpu_seconds"] = 0
    assert any("restore_cpu_seconds" in p for p in validate(doc, ["restore"]))


# --- the fake half, end to end ------------------------------------------------------------------


def test_fake_half_restores_every_published_volume() -> None:
    out = restorefake.run((20, 60), Progress(enabled=False), repeats=2, samples=3)
    assert [lv["volumes"] for lv in out["levels"]] == [20, 60]
    for lv in out["levels"]:
        assert lv["restore_seconds"] > 0 and len(lv["restore_runs"]) == 2
        assert lv["zfs_sets"] == 0  # device nodes present: restore sets nothing in ZFS
        assert lv["publish_ms"] > 0 and lv["republish_ms"] > 0 and lv["unpublish_ms"] > 0
        assert lv["restore_cpu_seconds"] > 0 and lv["publish_cpu_ms"] > 0 and lv["unpublish_cpu_ms"] > 0


def test_cli_fake_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["restore", "--fake-only", "--fake-sizes", "20,50", "--samples", "2", "-q", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [lv["volumes"] for lv in doc["suites"]["restore"]["data"]["fake"]["levels"]] == [20, 50]
    assert "fakes: restore per volume, CPU time" in capsys.readouterr().out


def test_cli_fails_when_restore_grows_faster_than_linear(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(restorefake, "run", lambda *a, **k: _fake_levels({100: 0.05, 10_000: 50.0}))
    assert main(["restore", "--fake-only", "-q"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "super-linear" in captured.err


def test_cli_refuses_bad_restore_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scale", "--fake-only"]) == 2
    assert main(["restore", "--fake-only", "--fake-sizes", "100"]) == 2
    assert "at least two sizes" in capsys.readouterr().err


def test_restore_runs_only_when_named() -> None:
    from bench.config import SUITES

    assert "restore" not in SUITES  # "all" keeps its duration; restore builds 1,000 exports in the lab
    cfg = make_config(("restore",), quick=False, sizes=None)
    assert cfg.restore_sizes == (100, 1000) and cfg.restore_fake_sizes == (100, 1000, 10000)


# --- batched `zfs set` ----------------------------------------------------------------------------


def _libzfs(monkeypatch: pytest.MonkeyPatch, returncode: int = 0, stderr: str = "") -> list[dict[str, Any]]:
    monkeypatch.setitem(sys.modules, "libzfs_core", types.ModuleType("libzfs_core"))
    calls: list[dict[str, Any]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append({"argv": argv, "timeout": kw.get("timeout")})
        return subprocess.CompletedProcess(argv, returncode, "", stderr)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_libzfs_sets_many_datasets_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _libzfs(monkeypatch)
    zfs = LibZfs(timeout=10)
    assert isinstance(zfs, BatchProps)
    zfs.set_props_many(["tank/zvolt/v/a", "tank/zvolt/v/b", "tank/zvolt/v/c"], {"volmode": "dev"})
    assert calls == [{"argv": ["zfs", "set", "volmode=dev", "tank/zvolt/v/a", "tank/zvolt/v/b", "tank/zvolt/v/c"],
                      "timeout": 30}]  # the time limit is per dataset
    zfs.set_props_many([], {"volmode": "dev"})
    assert len(calls) == 1
    with pytest.raises(ZfsError):
        zfs.set_props_many(["tank/zvolt/v/a"], {"volmode;rm": "x"})
    with pytest.raises(ZvoltError):
        zfs.set_props_many(["tank/zvolt/v/a", "-r"], {"volmode": "dev"})
    assert len(calls) == 1
    zfs.set_props("tank/zvolt/v/a", {"volmode": "none", "zvolt:hosts": "-"})  # unchanged
    assert calls[-1]["argv"] == ["zfs", "set", "volmode=none", "zvolt:hosts=-", "tank/zvolt/v/a"]


def test_libzfs_batch_failure_is_a_zfs_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _libzfs(monkeypatch, returncode=1, stderr="cannot open 'tank/zvolt/v/b': dataset does not exist")
    with pytest.raises(ZfsError) as err:
        LibZfs().set_props_many(["tank/zvolt/v/a", "tank/zvolt/v/b"], {"volmode": "dev"})
    assert err.value.errno == errno.ENOENT


class BatchFakeZfs(FakeZfs):
    """FakeZfs plus the batch call, with `zfs set`'s behaviour: goes on past a bad dataset, then fails."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def set_props_many(self, names: Sequence[str], props: Mapping[str, str]) -> None:
        self.batches.append(list(names))
        bad = []
        for name in names:
            if name in self.fail_set or name not in self.ds:
                bad.append(name)
                continue
            self.ds[name].props.update(props)
        if bad:
            raise ZfsError(errno.EIO, f"cannot set property for {bad}")


def _published_node(tmp_path: Path, n: int) -> tuple[BatchFakeZfs, str]:
    zfs = BatchFakeZfs()
    state = str(tmp_path / "state")
    restorefake.build(n, state, zfs=zfs)
    for ds in zfs.volumes("tank/zvolt/v"):
        zfs.ds[ds].props["volmode"] = "none"  # no device node yet (udev late, or a reboot)
    zfs.calls.clear()
    return zfs, state


def test_restore_activates_missing_devices_in_batches(tmp_path: Path) -> None:
    from agent.recovery import ACTIVATE_BATCH

    n = ACTIVATE_BATCH * 2 + 5
    zfs, state = _published_node(tmp_path, n)
    node = make_node(state, str(tmp_path / "configfs"), zfs=zfs)
    assert node.readiness.ready
    assert [len(b) for b in zfs.batches] == [ACTIVATE_BATCH, ACTIVATE_BATCH, 5]
    assert not [c for c in zfs.calls if c.startswith("set ")]  # no volume was set on its own
    assert len(node.volumes.exports.exported_ids()) == n and not node.volumes.unrestored


def test_a_failed_batch_falls_back_to_one_volume_at_a_time(tmp_path: Path) -> None:
    zfs, state = _published_node(tmp_path, 10)
    bad = "tank/zvolt/v/r0000003"
    zfs.fail_set[bad] = errno.EIO
    node = make_node(state, str(tmp_path / "configfs"), zfs=zfs)
    assert node.readiness.ready
    assert len(zfs.batches) == 1
    # The batch set the nine good ones before failing; the bad one failed again alone.
    assert [c for c in zfs.calls if c.startswith("set ")] == [f"set {bad} volmode"]
    assert set(node.volumes.unrestored) == {"r0000003"}
    assert len(node.volumes.exports.exported_ids()) == 9


def test_adapters_without_a_batch_call_set_one_by_one() -> None:
    zfs = FakeZfs()
    zfs.create_filesystem("tank")
    for ds in ("tank/a", "tank/b"):
        zfs.create_volume(ds, 1 << 20, {"volmode": "none"})
    assert not isinstance(zfs, BatchProps)
    set_props_many(zfs, ["tank/a", "tank/b"], {"volmode": "dev"})
    assert [c for c in zfs.calls if c.startswith("set ")] == ["set tank/a volmode", "set tank/b volmode"]


def test_idempotent_publish_does_not_list_the_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export check looks up its own port link; listing the port made it O(exports)."""
    zfs, state = _published_node(tmp_path, 5)
    node = make_node(state, str(tmp_path / "configfs"), zfs=zfs)

    def no_listing(self: nvmet.Port) -> list[str]:
        raise AssertionError("the port's subsystem list was read")

    monkeypatch.setattr(nvmet.Port, "subsystems", no_listing)
    host = restorefake.host_nqns()[0]
    assert node.volumes.exports.condition("r0000000", "tank/zvolt/v/r0000000", [host]) == (True, "")
    node.volumes.publish("r0000000", host)  # already published: answered from the condition check
    sub = node.root.subsystem(node.volumes.exports.nqn("r0000000"))
    port = node.root.find_port("10.42.0.1", "4420")
    assert port is not None
    port.remove_subsystem(sub.nqn)
    assert node.volumes.exports.condition("r0000000", "tank/zvolt/v/r0000000", [host]) == (
        False, "subsystem is not linked to the NVMe/TCP port")


# --- in-guest helpers (pure parts) ----------------------------------------------------------------


def test_guest_names_follow_from_the_volume_name() -> None:
    assert inguest_restore.volume_name("bench-abc-r", 7) == "bench-abc-r-0000007"
    assert inguest_restore.volume_id("bench-abc-r", 7) == names.id_for_name("bench-abc-r-0000007")
    assert inguest_restore.node_prefix("storage-0") == "nqn.2026-11.io.zvolt:storage-0:"
    assert names.subsystem_nqn("storage-0", "v1").startswith(inguest_restore.node_prefix("storage-0"))


def _tree(root: Path, prefix: str) -> None:
    """An nvmet configfs tree as a plain directory: two of this node's exports and one other."""
    host = root / "hosts" / "nqn.2014-08.org.nvmexpress:uuid:h1"
    host.mkdir(parents=True)
    (root / "hosts" / "nqn.2014-08.org.nvmexpress:uuid:h2").mkdir()
    port = root / "ports" / "1"
    (port / "subsystems").mkdir(parents=True)
    (port / "referrals").mkdir()
    for nqn in (f"{prefix}va", f"{prefix}vb", "nqn.2026-11.io.zvolt:other:vc"):
        sub = root / "subsystems" / nqn
        (sub / "namespaces" / "1").mkdir(parents=True)
        (sub / "namespaces" / "1" / "enable").write_text("1\n")
        (sub / "allowed_hosts").mkdir()
        (sub / "allowed_hosts" / host.name).symlink_to(host)
        (port / "subsystems" / nqn).symlink_to(sub)


def test_clear_exports_leaves_what_a_reboot_leaves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = inguest_restore.node_prefix("storage-0")
    _tree(tmp_path, prefix)
    monkeypatch.setattr(Path, "rmdir", lambda self: shutil.rmtree(self))  # configfs drops attribute files itself
    assert inguest_restore.linked_subsystems(prefix, tmp_path) == 2
    out = inguest_restore.clear_exports(prefix, tmp_path)
    # Another node's export keeps its host group and the port it is linked to.
    assert out == {"subsystems": 2, "hosts": 1, "ports": 0}
    assert sorted(p.name for p in (tmp_path / "subsystems").iterdir()) == ["nqn.2026-11.io.zvolt:other:vc"]
    assert inguest_restore.linked_subsystems(prefix, tmp_path) == 0
    assert inguest_restore.clear_exports("nqn.2026-11.io.zvolt:other:", tmp_path) == {
        "subsystems": 1, "hosts": 1, "ports": 1}
    assert not any((tmp_path / "ports").iterdir())
