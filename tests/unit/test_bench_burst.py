"""The burst suite's arithmetic and its in-flight bound, without a guest."""

from __future__ import annotations

import io
import threading
import time
from functools import partial

import grpc
import pytest

from bench.config import make_config
from bench.progress import Progress
from bench.results import Report, Row, SuiteResult
from bench.schema import validate
from bench.suites import burst


def test_figures_are_calls_over_wall_time_and_the_tail() -> None:
    f = burst.figures({"seconds": [0.1] * 99 + [2.0], "wall": 4.0, "cpu_s": 3.0})
    assert f["calls"] == 100 and f["per_s"] == 25.0 and f["wall_s"] == 4.0 and f["cpu_ms_per_call"] == 30.0
    assert f["p50_ms"] == pytest.approx(100.0)
    assert 100.0 < f["p99_ms"] < 2000.0  # the one slow call shows in p99, not p50


def test_csi_burst_keeps_k_in_flight_and_returns_results_in_call_order() -> None:
    live, peak, lock = [0], [0], threading.Lock()

    def call(i: int) -> int:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.01)
        with lock:
            live[0] -= 1
        return i

    spent = iter([10.0, 12.5])
    out, raw = burst._csi_burst(Progress(enabled=False), "test", [partial(call, i) for i in range(40)], 8,
                                lambda: next(spent))
    assert out == list(range(40)) and raw["cpu_s"] == 2.5
    assert peak[0] == 8
    assert len(raw["seconds"]) == 40 and raw["wall"] > 0


def test_a_long_burst_says_it_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(burst, "TICK_S", 0.02)
    stream = io.StringIO()
    burst._csi_burst(Progress(stream=stream), "slow", [lambda: time.sleep(0.15)], 1)
    assert "burst: slow still running" in stream.getvalue() and "0/1 done" in stream.getvalue()


def _phase() -> dict[str, float]:
    return {"calls": 10, "wall_s": 1.0, "per_s": 10.0, "p50_ms": 5.0, "p99_ms": 9.0, "cpu_ms_per_call": 2.0}


def test_schema_wants_every_phase_on_both_sides_when_csi_ran() -> None:
    phases = ("clone", "snapshot", "delete_snapshot", "delete_volume")
    full = {"bare": {p: _phase() for p in phases}, "csi": {p: _phase() for p in phases}}
    ok = SuiteResult("burst", rows=[Row("x", 1.0, "/s")], data=full)
    assert validate(Report(quick=True, suites=[ok]).as_dict(), ["burst"]) == []
    del full["csi"]["delete_volume"]
    problems = validate(Report(quick=True, suites=[ok]).as_dict(), ["burst"])
    assert any("csi.delete_volume" in p for p in problems), problems


def test_burst_is_named_only_and_quick_is_small() -> None:
    assert "burst" not in make_config(("branch",), True, None).suites
    quick = make_config(("burst",), True, None)
    full = make_config(("burst",), False, None)
    assert (quick.burst_count, quick.burst_in_flight) == (24, 8)
    assert (full.burst_count, full.burst_in_flight) == (1000, 32)


class _Rpc(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_a_call_past_its_deadline_is_retried_like_a_sidecar_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.suites.burst.time.sleep", lambda s: None)
    failures = {1: [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE]}

    def call(i: int) -> int:
        if failures.get(i):
            raise _Rpc(failures[i].pop(0))
        return i

    out, raw = burst._csi_burst(Progress(enabled=False), "t", [partial(call, i) for i in range(4)], 2)
    assert out == [0, 1, 2, 3] and raw["retries"] == 2
    assert burst.figures(raw)["retries"] == 2


def test_an_error_a_sidecar_would_not_retry_fails_the_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.suites.burst.time.sleep", lambda s: None)

    def call() -> None:
        raise _Rpc(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(grpc.RpcError):
        burst._csi_burst(Progress(enabled=False), "t", [call], 1)
