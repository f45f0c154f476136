import math

import pytest

from bench.stats import growth, percentile, ratio, slope, summarize


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 95) == pytest.approx(3.85)


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_converts_seconds_to_ms() -> None:
    s = summarize([0.010, 0.020, 0.030, 0.040, 1.0])
    assert s.n == 5
    assert s.p50_ms == pytest.approx(30.0)
    assert s.min_ms == pytest.approx(10.0)
    assert s.max_ms == pytest.approx(1000.0)
    assert s.p95_ms > s.p50_ms
    assert s.mean_ms == pytest.approx(220.0)


def test_ratio_refuses_unusable_baselines() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(3.0, 0.0) is None
    assert ratio(3.0, math.nan) is None


def test_slope_is_least_squares() -> None:
    assert slope([1, 2, 3], [2, 4, 6]) == pytest.approx(2.0)
    assert slope([1, 1], [2, 3]) is None
    with pytest.raises(ValueError):
        slope([1, 2], [1])


def test_growth_flat_and_growing_series() -> None:
    sizes = [100, 1000, 10000, 100000]
    flat = growth(sizes, [50.0, 50.0, 50.0, 50.0])
    assert flat["per_decade"] == pytest.approx(1.0)
    assert flat["last_over_first"] == pytest.approx(1.0)
    assert flat["per_1000_ms"] == pytest.approx(0.0)
    # Doubling per decade of pool size is what a listing in the request path would look like.
    grows = growth(sizes, [10.0, 20.0, 40.0, 80.0])
    assert grows["per_decade"] is not None and grows["per_decade"] > 1.5
    assert grows["last_over_first"] == pytest.approx(8.0)
    assert growth([100], [1.0])["per_decade"] is None
