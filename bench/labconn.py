"""Boot or reuse a lab guest for the bench (instance "bench" by default, so others' guests are untouched)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.guest import LabLike


def open_lab(instance: str, pool_disk: Path | None = None) -> LabLike:
    os.environ["ZVOLT_LAB_NAME"] = instance
    try:
        from lab import guest as lab_guest
    except ImportError as e:  # the lab package is another engineer's work in progress
        raise SystemExit(f"zvolt-bench: the lab package is not available: {e}") from e
    up = getattr(lab_guest, "up", None)
    if up is None:
        raise SystemExit("zvolt-bench: lab.guest has no up() yet: cannot boot or reuse a guest")
    lab: LabLike = up(instance=instance, pool_disk=pool_disk) if pool_disk else up(instance=instance)
    return lab
