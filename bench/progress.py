"""Progress lines on stderr for long work, so a person (or CI log) sees the bench is alive."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Progress:
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    start: float = field(default_factory=time.monotonic)
    enabled: bool = True

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[bench +{time.monotonic() - self.start:7.1f}s] {message}", file=self.stream, flush=True)
