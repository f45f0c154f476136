"""Plain-text table of a report: one block per suite, ratios next to their baselines."""

from __future__ import annotations

from bench.results import Report, SuiteResult


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def render_suite(suite: SuiteResult) -> str:
    header = ["size", "metric", "zvolt", "unit", "baseline", "baseline is", "ratio", "target"]
    lines: list[list[str]] = [header]
    for r in suite.rows:
        ratio = r.ratio
        lines.append(
            [
                "" if r.size is None else f"{r.size:,}",
                r.metric,
                _num(r.value),
                r.unit,
                _num(r.baseline),
                r.baseline_label,
                "" if ratio is None else f"{ratio:.2f}x",
                r.target,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [f"== {suite.name} ({suite.seconds:.0f} s)" + (f"  FAILED: {suite.error}" if suite.error else "")]
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out.extend(f"  note: {n}" for n in suite.notes)
    return "\n".join(out)


def render(report: Report) -> str:
    return "\n\n".join(render_suite(s) for s in report.suites) + "\n"
