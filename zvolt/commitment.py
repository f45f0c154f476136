"""The commitment rule, in one place for the agent and the controller.

A pool's commitment is the logical size it has promised: every volume's size (a clone counts its
full size, since it can come to own every block) plus what each snapshot can come to pin. It may
reach `ratio` x the pool's size; a new volume or a growth that would go above is refused.
"""

from __future__ import annotations

import math

from zvolt.errors import invalid

# See README.md "Bounded overcommit" for why 3.
DEFAULT_RATIO = 3.0
MAX_RATIO = 1000.0


def check_ratio(value: object, what: str) -> float:
    try:
        ratio = float(str(value))
    except ValueError:
        raise invalid(f"{what} {value!r} is not a number") from None
    if not math.isfinite(ratio) or not 0 < ratio <= MAX_RATIO:
        raise invalid(f"{what} must be above 0 and at most {MAX_RATIO:g}, not {value!r}")
    return ratio


def limit_bytes(ratio: float, pool: int) -> int:
    return int(ratio * pool)


def headroom(committed: int, pool: int, ratio: float) -> int:
    """Logical bytes the limit still admits."""
    return max(limit_bytes(ratio, pool) - committed, 0)


def refusal(who: str, what: str, charge: int, committed: int, pool: int, ratio: float) -> str:
    return (f"commitment limit of {who} reached: {what} adds {charge} bytes to the {committed} bytes committed, "
            f"over the limit of {limit_bytes(ratio, pool)} bytes ({ratio:g} x pool size {pool} bytes)")
