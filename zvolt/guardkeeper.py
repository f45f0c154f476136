"""Keeps the NVMe/TCP guard (zvolt/nftguard.py) in place: applies it once at start (a process
that cannot install it refuses to run), then re-checks it every `interval` seconds and
re-applies it when someone flushed, deleted or edited the table (another firewall manager, an
`nft flush ruleset`, an iptables-nft restore). On exit the rules stay: a node plugin or agent
that is stopped or crashes leaves the node guarded (the safe default).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from zvolt.commands import CommandError
from zvolt.nft import Nft, NftError
from zvolt.nftguard import GuardConfigError, GuardSpec, Observed, Ruleset, observe, ruleset

_log = logging.getLogger("zvolt.guard")

DEFAULT_INTERVAL = 30.0


class GuardError(RuntimeError):
    """The guard could not be installed (or read back)."""


class GuardMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.reapplied = Counter(f"{prefix}_guard_reapplied",
                                 "Times the NVMe/TCP guard table was found missing or changed and was re-applied",
                                 registry=registry)
        self.dropped = Gauge(f"{prefix}_guard_dropped_packets",
                             "Packets to NVMe/TCP ports the guard dropped since it was last applied", registry=registry)
        self.installed = Gauge(f"{prefix}_guard_installed",
                               "1 when the last check found the guard table exactly as zvolt wrote it",
                               registry=registry)


@dataclass
class GuardKeeper:
    rules: Ruleset
    nft: Nft
    metrics: GuardMetrics | None = None
    interval: float = DEFAULT_INTERVAL
    reapplied: int = 0
    # Expressions as nft listed them right after our own apply: a later listing that differs
    # was edited by someone else, even where the rule comments still match.
    _baseline: tuple[str, ...] | None = field(default=None, repr=False)

    def _look(self) -> Observed | None:
        try:
            listing = self.nft.list_table(self.rules.family, self.rules.table)
            return None if listing is None else observe(listing, self.rules)
        except (NftError, CommandError, GuardConfigError) as exc:
            raise GuardError(f"cannot read table {self.rules.family} {self.rules.table}: {exc}") from exc

    def apply(self) -> Observed:
        try:
            self.nft.apply(self.rules.script())
        except (NftError, CommandError) as exc:
            raise GuardError(f"cannot install table {self.rules.family} {self.rules.table}: {exc}") from exc
        seen = self._look()
        if seen is None or seen.fingerprint != self.rules.expected():
            raise GuardError(f"nft accepted table {self.rules.family} {self.rules.table} but lists it differently")
        self._baseline = seen.exprs
        self._report(seen)
        return seen

    def intact(self, seen: Observed | None) -> bool:
        return seen is not None and seen.fingerprint == self.rules.expected() and seen.exprs == self._baseline

    def check(self) -> bool:
        """True when the table was not as written and had to be re-applied."""
        seen = self._look()
        if self.intact(seen):
            assert seen is not None
            self._report(seen)
            return False
        if self.metrics:
            self.metrics.installed.set(0)
        _log.warning("NVMe/TCP guard was %s: re-applying", "missing" if seen is None else "changed",
                     extra={"fields": {"table": f"{self.rules.family} {self.rules.table}", "event": "guard_reapply"}})
        self.apply()
        self.reapplied += 1
        if self.metrics:
            self.metrics.reapplied.inc()
        return True

    def _report(self, seen: Observed) -> None:
        if self.metrics:
            self.metrics.installed.set(1)
            self.metrics.dropped.set(seen.dropped_packets)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.check()
            except GuardError as exc:
                # Keep trying: the rules may come back (nft busy, a transient netlink error).
                if self.metrics:
                    self.metrics.installed.set(0)
                _log.error("NVMe/TCP guard check failed: %s", exc, extra={"fields": {"event": "guard_error"}})


def install(spec: GuardSpec, *, registry: CollectorRegistry | None = None, prefix: str = "zvolt",
            interval: float = DEFAULT_INTERVAL, nft: Nft | None = None,
            stop: threading.Event | None = None) -> GuardKeeper:
    """Apply the guard now (GuardError if that fails), then keep it from a daemon thread."""
    if not 1 <= interval <= 3600:
        raise GuardError(f"guard check interval must be 1-3600 seconds, not {interval}")
    metrics = GuardMetrics(registry, prefix) if registry is not None else None
    keeper = GuardKeeper(ruleset(spec), nft or Nft(), metrics, interval)
    keeper.apply()
    _log.info("NVMe/TCP guard installed", extra={"fields": {
        "event": "guard_installed", "role": spec.role.value, "table": f"{keeper.rules.family} {keeper.rules.table}",
        "storage_network": str(spec.network), "ports": list(spec.ports), "interval_s": interval}})
    threading.Thread(target=keeper.run, args=(stop or threading.Event(),), name="nft-guard", daemon=True).start()
    return keeper
