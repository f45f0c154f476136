import json
import sys
from pathlib import Path

import pytest

from bench import inguest


def _fio_doc(direction: str) -> dict[str, object]:
    side = {"iops": 1234.5, "clat_ns": {"mean": 800000.0, "percentile": {"50.000000": 700000, "99.000000": 2000000}}}
    other = {"iops": 0.0, "clat_ns": {"mean": 0.0}}
    return {"jobs": [{"job_runtime": 4000, "read": side if direction == "read" else other,
                      "write": side if direction == "write" else other}]}


def test_parse_fio_reads_the_right_direction_after_warnings() -> None:
    text = "fio: some warning\n" + json.dumps(_fio_doc("write"))
    out = inguest.parse_fio(text, "write")
    assert out["iops"] == 1234.5
    assert out["lat_mean_us"] == 800.0
    assert out["lat_p50_us"] == 700.0
    assert out["lat_p99_us"] == 2000.0
    assert out["seconds"] == 4.0
    assert inguest.parse_fio(json.dumps(_fio_doc("write")), "read")["iops"] == 0.0
    with pytest.raises(ValueError):
        inguest.parse_fio("no json here", "read")


def test_parse_pgbench() -> None:
    text = ("transaction type: <builtin: TPC-B (sort of)>\nlatency average = 12.345 ms\n"
            "initial connection time = 3.2 ms\ntps = 321.987654 (without initial connection time)\n")
    assert inguest.parse_pgbench(text) == {"tps": 321.987654, "latency_ms": 12.345}
    with pytest.raises(ValueError):
        inguest.parse_pgbench("error: connection refused")


@pytest.mark.parametrize("path", ["/dev/zd16", "/dev/nvme1n1", "/dev/zvol/tank/benchdp/fio1"])
def test_device_accepts_bench_devices(path: str) -> None:
    assert inguest._device(path) == path


@pytest.mark.parametrize("path", ["/dev/sda", "/dev/zvol/../sda", "/etc/passwd", "/dev/zd1; rm -rf /", ""])
def test_device_rejects_everything_else(path: str) -> None:
    with pytest.raises(ValueError):
        inguest._device(path)


def _subsys(base: Path, name: str, nqn: str, entries: list[str]) -> None:
    d = base / name
    d.mkdir(parents=True)
    (d / "subsysnqn").write_text(nqn + "\n")
    for e in entries:
        (d / e).mkdir(parents=True)


def test_find_nvme_device_by_nqn_multipath_head(tmp_path: Path) -> None:
    _subsys(tmp_path, "nvme-subsys0", "nqn.2026-11.io.zvolt:other", ["nvme0", "nvme0n1"])
    _subsys(tmp_path, "nvme-subsys1", "nqn.2026-11.io.zvolt.bench:x", ["nvme1", "nvme1n1"])
    assert inguest._find_nvme_device("nqn.2026-11.io.zvolt.bench:x", tmp_path) == "/dev/nvme1n1"
    assert inguest._find_nvme_device("nqn.2026-11.io.zvolt.bench:none", tmp_path) == ""


def test_find_nvme_device_without_multipath(tmp_path: Path) -> None:
    _subsys(tmp_path, "nvme-subsys2", "nqn.2026-11.io.zvolt.bench:y", ["nvme2/nvme2c2n1"])
    assert inguest._find_nvme_device("nqn.2026-11.io.zvolt.bench:y", tmp_path) == "/dev/nvme2n1"


def test_main_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert inguest.main(["bogus", "{}"]) == 2
    assert "usage" in capsys.readouterr().err


def test_rss_finds_nothing_for_an_absent_process() -> None:
    assert inguest.rss({"match": ["--no-such-process-argument-zvolt"]}) == {"pid": 0, "rss_kib": 0}


def test_filler_properties_are_what_the_agent_rebuild_reads() -> None:
    """The bench fills the pool behind the agent's back; its index rebuild must see real volumes."""
    from agent.index import SnapshotRec, VolumeRec
    from agent.records import Layout, from_props

    layout = Layout("tank/benchfill")
    vprops = {**inguest.agent_volume_props("f0000007", 1 << 30, "1700000000"), "volsize": str(1 << 30),
              "volblocksize": "16384", "compression": "lz4", "origin": "-"}
    vol = from_props(layout, "tank/benchfill/v/f0000007", vprops)
    assert isinstance(vol, VolumeRec)
    assert (vol.id, vol.name, vol.size, vol.hosts, vol.thick) == ("f0000007", "bench-fill-f0000007", 1 << 30, [], False)
    sprops = {**inguest.agent_snapshot_props("f0000007", 0, "1700000000"), "volsize": str(1 << 30)}
    snap = from_props(layout, "tank/benchfill/v/f0000007@s0", sprops)
    assert isinstance(snap, SnapshotRec)
    assert (snap.id, snap.volume_id, snap.name) == ("f0000007@s0", "f0000007", "bench-fill-f0000007-s0")


class _FakeLzc:
    """libzfs_core as fill() uses it: exists/create/snapshot, with a lock like the kernel's."""

    def __init__(self) -> None:
        import threading

        self.objects: dict[bytes, dict[bytes, object]] = {}
        self.calls = 0
        self._mu = threading.Lock()

    def lzc_exists(self, name: bytes) -> bool:
        with self._mu:
            return name in self.objects

    def lzc_create(self, name: bytes, ds_type: str, props: dict[bytes, object]) -> None:
        assert ds_type == "zvol"
        with self._mu:
            assert name not in self.objects, f"{name!r} created twice"
            self.objects[name] = dict(props)
            self.calls += 1

    def lzc_snapshot(self, snaps: list[bytes], props: dict[bytes, object] | None = None) -> None:
        with self._mu:
            for s in snaps:
                assert s.split(b"@")[0] in self.objects and s not in self.objects, s
                self.objects[s] = dict(props or {})
            self.calls += 1


@pytest.mark.parametrize("agent_props", [True, False])
def test_fill_in_parallel_makes_each_object_once(monkeypatch: pytest.MonkeyPatch, agent_props: bool) -> None:
    fake = _FakeLzc()
    monkeypatch.setitem(sys.modules, "libzfs_core", fake)
    args = {"parent": "tank/benchfill/v", "start": 0, "count": 40, "snaps": 3, "agent_props": agent_props,
            "workers": 8, "batch": 25}
    out = inguest.fill(args)
    assert (out["created_volumes"], out["created_snapshots"]) == (40, 120)
    assert len(fake.objects) == 160
    snap = fake.objects[b"tank/benchfill/v/f0000039@s2"]
    if agent_props:
        assert snap[b"zvolt:name"] == b"bench-fill-f0000039-s2" and snap[b"zvolt:volume"] == b"f0000039"
    else:
        assert snap == {} and fake.calls == 40 + 5  # 120 snapshots in batches of 25
    # A repeat over a pool that already holds them (a reused disk) makes nothing, and extends cleanly.
    assert inguest.fill(args)["created_volumes"] == 0
    more = inguest.fill({**args, "start": 40, "count": 10})
    assert (more["created_volumes"], more["created_snapshots"]) == (10, 30) and len(fake.objects) == 200
