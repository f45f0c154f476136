"""Boot or reuse a lab guest for the bench (instance "bench" by default, so others' guests are untouched)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.guest import LabLike


def open_lab(instance: str, pool_disk: Path | None = None) -> LabLike:
    """`zvolt-lab up` semantics: reuse the running instance or boot one (building the image if needed)."""
    os.environ["ZVOLT_LAB_NAME"] = instance
    from lab.control import UpOptions, up
    from lab.paths import Cache

    lab: LabLike = up(Cache.from_env(), instance, UpOptions(pool_disk=pool_disk), sys.stderr)
    return lab
