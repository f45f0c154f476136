"""Human output: ages like kubectl's, tables, and the branch tree."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import yaml


def age(created: datetime | None, now: datetime | None = None) -> str:
    """kubectl-style short age: 45s, 12m, 3h, 5d."""
    if created is None:
        return "<unknown>"
    now = now or datetime.now(UTC)
    secs = max(0, int((now - created).total_seconds()))
    if secs < 120:
        return f"{secs}s"
    if secs < 2 * 3600:
        return f"{secs // 60}m"
    if secs < 2 * 86400:
        return f"{secs // 3600}h"
    return f"{secs // 86400}d"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows]]
    return "\n".join(lines)


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False).rstrip("\n")
    raise ValueError(f"unknown output format {fmt!r}")
