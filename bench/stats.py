"""Small statistics for latency samples: percentiles, ratios and the slope across pool sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Latency:
    """Summary of one series of latency samples, in milliseconds."""

    n: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "mean_ms": self.mean_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (the usual "type 7" definition); q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(seconds: Sequence[float]) -> Latency:
    """Summarize samples given in seconds (what time.perf_counter differences are)."""
    ms = [s * 1000.0 for s in seconds]
    return Latency(
        n=len(ms),
        p50_ms=percentile(ms, 50),
        p95_ms=percentile(ms, 95),
        mean_ms=sum(ms) / len(ms),
        min_ms=min(ms),
        max_ms=max(ms),
    )


def ratio(value: float, baseline: float) -> float | None:
    """value / baseline, or None when the baseline is not a usable positive number."""
    if baseline <= 0 or math.isnan(baseline) or math.isnan(value):
        return None
    return value / baseline


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope dy/dx; None with fewer than two distinct x values."""
    if len(xs) != len(ys):
        raise ValueError("slope needs as many x as y values")
    if len(set(xs)) < 2:
        return None
    mx = sum(xs) / len(xs)
    my = sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx


def growth(sizes: Sequence[int], values: Sequence[float]) -> dict[str, float | None]:
    """How a latency moves with pool size.

    `per_1000_ms` is the least-squares slope in ms per 1,000 extra objects; `per_decade` is the
    slope against log10(size) expressed as a factor per 10x objects, which is what "flat from 100
    to 100,000" means; `last_over_first` compares the largest size with the smallest.
    """
    if len(sizes) != len(values):
        raise ValueError("growth needs one value per size")
    if len(sizes) < 2:
        return {"per_1000_ms": None, "per_decade": None, "last_over_first": None}
    per_obj = slope([float(s) for s in sizes], list(values))
    logs = [math.log10(max(s, 1)) for s in sizes]
    per_log = slope(logs, list(values))
    mean = sum(values) / len(values)
    per_decade = None if per_log is None or mean <= 0 else 1.0 + per_log / mean
    return {
        "per_1000_ms": None if per_obj is None else per_obj * 1000.0,
        "per_decade": per_decade,
        "last_over_first": ratio(values[-1], values[0]),
    }
