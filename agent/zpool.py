"""The zpool adapter: the only place that builds `zpool` argv (pool-wide figures the zfs CLI lacks)."""

from __future__ import annotations

import subprocess
from typing import Protocol

from zvolt import names


class PoolReader(Protocol):
    def fragmentation(self, pool: str) -> int | None: ...


class Zpool:
    def __init__(self, zpool_bin: str = "zpool", timeout: float = 30.0) -> None:
        self._zpool = zpool_bin
        self._timeout = timeout

    def fragmentation(self, pool: str) -> int | None:
        """Free-space fragmentation in percent; None when ZFS does not know it ("-": e.g. a pool
        without spacemap_histogram) or the read failed, which a metric must not turn into 0."""
        argv = [self._zpool, "get", "-H", "-p", "-o", "value", "fragmentation", names.check_pool(pool)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self._timeout, check=False)
        except subprocess.TimeoutExpired:
            return None
        value = proc.stdout.strip().rstrip("%")
        return int(value) if proc.returncode == 0 and value.isdigit() else None
