"""What one bench run does: suites, pool sizes, sample counts; --quick shrinks everything."""

from __future__ import annotations

from dataclasses import dataclass

SUITES = ("branch", "scale", "datapath", "attach")
# Suites run only when named (not by "all"): restore builds 1,000 published volumes in the lab
# (tens of minutes under TCG).
# burst makes 1,000 clones in a row (tens of minutes under TCG).
EXTRA_SUITES = ("restore", "burst")
RESTORE_SIZES = (100, 1000)
RESTORE_FAKE_SIZES = (100, 1000, 10000)
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
    restore_sizes: tuple[int, ...] = RESTORE_SIZES            # restore: published volumes in the lab
    restore_fake_sizes: tuple[int, ...] = RESTORE_FAKE_SIZES  # restore: published volumes on the fakes
    restore_samples: int = 5        # restore, lab: publish/unpublish samples per size
    restore_fake_samples: int = 30  # restore, fakes: publish/unpublish samples per size
    restore_cold: bool = True       # restore, lab: also restart with the device nodes gone
    fake_only: bool = False         # restore: the fake half only, no guest
    burst_count: int = 1000         # burst: calls per burst
    burst_in_flight: int = 32       # burst: calls at once

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
    restore_sizes: tuple[int, ...] | None = None,
    fake_sizes: tuple[int, ...] | None = None,
    fake_only: bool = False,
    restore_cold: bool = True,
) -> BenchConfig:
    for s in suites:
        if s not in SUITES + EXTRA_SUITES:
            raise ValueError(f"unknown suite {s!r}; choose from {', '.join(SUITES + EXTRA_SUITES)} or all")
    if fake_only and "restore" not in suites:
        raise ValueError("--fake-only runs the restore suite's fake half: name the restore suite")
    for given in (restore_sizes, fake_sizes):
        if given is not None and len(given) < 2:
            raise ValueError("restore compares the smallest size with the largest: give at least two sizes")
    if quick:
        return BenchConfig(
            suites=suites, quick=True, sizes=sizes or QUICK_SIZES, samples=5, fio_runtime_s=4,
            fio_size_bytes=64 << 20, pg_scale=1, pg_seconds=8, attach_samples=3, published=3,
            simulate=simulate, simulate_only=simulate_only, keep_fill=keep_fill,
            restore_sizes=restore_sizes or (10, 50), restore_fake_sizes=fake_sizes or (100, 1000),
            restore_samples=3, restore_fake_samples=10, restore_cold=restore_cold, fake_only=fake_only,
            burst_count=24, burst_in_flight=8,
        )
    return BenchConfig(
        suites=suites, quick=False, sizes=sizes or DEFAULT_SIZES, samples=20, fio_runtime_s=20,
        fio_size_bytes=256 << 20, pg_scale=5, pg_seconds=30, attach_samples=10, published=200,
        simulate=simulate, simulate_only=simulate_only, keep_fill=keep_fill,
        restore_sizes=restore_sizes or RESTORE_SIZES, restore_fake_sizes=fake_sizes or RESTORE_FAKE_SIZES,
        restore_cold=restore_cold, fake_only=fake_only,
    )
