import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.config import DEFAULT_SIZES, make_config, parse_sizes
from bench.simulate import PUBLISHED, levels


def test_parse_sizes_sorts_dedups_and_rejects_bad_values() -> None:
    assert parse_sizes("1000,100, 1_000,10000") == (100, 1000, 10000)
    with pytest.raises(ValueError):
        parse_sizes("0")
    with pytest.raises(ValueError):
        parse_sizes(",")


def test_quick_config_is_smaller_than_full() -> None:
    quick = make_config(("branch",), True, None)
    full = make_config(("branch",), False, None)
    assert full.sizes == DEFAULT_SIZES
    assert quick.max_size < full.max_size
    assert quick.samples < full.samples and quick.fio_runtime_s < full.fio_runtime_s
    with pytest.raises(ValueError):
        make_config(("nope",), True, None)


def test_unknown_suite_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nope", "--simulate-only"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_simulation_levels() -> None:
    assert levels(1_000_000, quick=False) == [10_000, 100_000, 1_000_000]
    assert levels(2_500, quick=True) == [1_000, 2_500]


def test_simulate_only_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.json"
    rc = main(["scale", "--simulate-only", "--simulate", "2500", "--quick", "--json", str(out), "-q"])
    assert rc == 0
    doc = json.loads(out.read_text())
    sim = doc["suites"]["scale"]["data"]["simulate"]
    assert [lv["volumes"] for lv in sim["levels"]] == [1_000, 2_500]
    last = sim["levels"][-1]
    # The restarted process really read the index the bench filled.
    assert last["snapshots"] == 2_500
    assert last["restart_seconds"] > 0
    assert last["rss_kib"] > 0
    assert "rss_marginal_bytes_per_volume" in last
    assert sim["published"] == PUBLISHED
    assert "sim restart to ready" in capsys.readouterr().out


def test_a_negative_published_count_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scale", "--simulate-only", "--published", "-1"]) == 2
    assert "--published must not be negative" in capsys.readouterr().err
