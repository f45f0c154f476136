"""What one bench run does: suites, pool sizes, sample counts; --quick shrinks everything."""

from __future__ import annotations

from dataclasses import dataclass

SUITES = ("branch", "scale", "datapath", "attach")
DEFAULT_SIZES = (100, 1000, 10000, 100000)
QUICK_SIZES = (20, 100)


@dataclass(frozen=True)
class BenchConfig:
    suites: tuple[str, ...]
    quick: bool
    sizes: tuple[int, ...]
    samples: int              # latency samples per operation (per size for branch)
    fio_runtime_s: int        # per fio job
    fio_size_bytes: int       # region fio touches (preconditioned first)
    pg_scale: int
    pg_seconds: int
    attach_samples: int
    simulate: int = 0         # >0: scale suite also runs the in-process simulation up to this many volumes
    simulate_only: bool = False
    keep_fill: bool = False   # keep the filler objects (a cached pool disk reuses them next run)
    node: str = "storage-0"   # storage node name the lab's agent uses
    worker: str = "worker-0"  # node id of the lab's node plugin
    parent: str = "zvolt"     # agent parent dataset below the pool
    fill_parent: str = "benchfill"
    snaps_per_volume: int = 1  # filler mix: each filler volume gets this many snapshots
    published: int = 0         # scale: filler volumes exported (ControllerPublish) during the restart

    @property
    def max_size(self) -> int:
        return max(self.sizes) if self.sizes else 0


def parse_sizes(text: str) -> tuple[int, ...]:
    sizes: list[int] = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        value = int(part)
        if value < 1:
            raise ValueError(f"pool size {value} must be positive")
        sizes.append(value)
    if not sizes:
        raise ValueError("no pool sizes given")
    return tuple(sorted(set(sizes)))


def make_config(
    suites: tuple[str, ...],
    quick: bool,
    sizes: tuple[int, ...] | None,
    simulate: int = 0,
    simulate_only: bool = False,
    keep_fill: bool = False,
) -> BenchConfig:
    for s in suites:
        if s not in SUITES:
            raise ValueError(f"unknown suite {s!r}; choose from {', '.join(SUITES)} or all")
    if quick:
        return BenchConfig(
            suites=suites, quick=True, sizes=sizes or QUICK_SIZES, samples=5, fio_runtime_s=4,
            fio_size_bytes=64 << 20, pg_scale=1, pg_seconds=8, attach_samples=3, published=3,
            simulate=simulate, simulate_only=simulate_only, keep_fill=keep_fill,
        )
    return BenchConfig(
        suites=suites, quick=False, sizes=sizes or DEFAULT_SIZES, samples=20, fio_runtime_s=20,
        fio_size_bytes=256 << 20, pg_scale=5, pg_seconds=30, attach_samples=10, published=200,
        simulate=simulate, simulate_only=simulate_only, keep_fill=keep_fill,
    )
