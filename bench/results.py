"""The result model every suite fills: table rows for people, structured data for the JSON file."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One line of the human table: a measurement next to the baseline it is compared with."""

    metric: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    target: str = ""
    size: int | None = None

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline is None or self.baseline <= 0:
            return None
        return self.value / self.baseline


@dataclass
class SuiteResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": self.seconds,
            "error": self.error,
            "notes": list(self.notes),
            "rows": [{**asdict(r), "ratio": r.ratio} for r in self.rows],
            "data": self.data,
        }


@dataclass
class Report:
    quick: bool
    suites: list[SuiteResult] = field(default_factory=list)
    started_unix: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tool": "zvolt-bench",
            "quick": self.quick,
            "started_unix": self.started_unix,
            "host": {"machine": platform.machine(), "python": platform.python_version()},
            "suites": {s.name: s.as_dict() for s in self.suites},
        }

    def write_json(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
