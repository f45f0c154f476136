"""The NVMe/TCP guard: the one place that decides which nftables rules keep pods away from
NVMe/TCP targets (issue 12: a pod can read a worker's host NQN and even its DH-HMAC-CHAP
secret from sysfs, so the network must not carry pod traffic to a target at all).

Pure: values in, ruleset text and the expected shape out; zvolt/nft.py runs nft and
zvolt/guardkeeper.py keeps the rules in place.

Roles (each its own table, so a node that is both worker and storage node keeps both):
- worker (node plugin): `forward` drops TCP to the storage network on the NVMe/TCP ports.
  Pod traffic is forwarded by the node; the node's own kernel initiator sends through
  `output` and is not affected.
- storage (agent): `input` drops TCP to the NVMe/TCP ports from any source outside the
  storage network (a pod on the storage node reaches the node's address through `input`, with
  its pod address as source), and IPv6 to those ports (the target listens on IPv4); plus the
  worker's `forward` rule, for pods on the storage node that head for other storage nodes.
No `log` statements (a flood of attempts must not flood the journal); every rule counts.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from zvolt.storagenet import MOVE_PORT, Network, StorageNetworkError, parse_network

FAMILY = "inet"
TABLES = {"worker": "zvolt_guard_worker", "storage": "zvolt_guard_storage"}
# Before the usual filter chains (priority 0): the counters see every attempt. Order does not
# change the outcome: a drop in any base chain of a hook is final.
PRIORITY = -10
COMMENT_PREFIX = "zvolt-guard:"
MAX_PORTS = 16


class Role(enum.Enum):
    WORKER = "worker"
    STORAGE = "storage"


class GuardConfigError(ValueError):
    """A value that would go into the ruleset is not valid."""


def parse_port(value: object) -> int:
    if isinstance(value, bool):
        raise GuardConfigError(f"NVMe/TCP port {value!r} is not a port number")
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        port = int(value.strip())
    else:
        raise GuardConfigError(f"NVMe/TCP port {value!r} is not a port number")
    if not 1 <= port <= 65535:
        raise GuardConfigError(f"NVMe/TCP port {port} is outside 1-65535")
    return port


def parse_ports(value: str | Iterable[object]) -> tuple[int, ...]:
    """`4420` or `4420,8009` (or an iterable of ports): sorted, without duplicates."""
    items: Iterable[object] = value.split(",") if isinstance(value, str) else value
    ports = tuple(sorted({parse_port(p) for p in items}))
    if not ports:
        raise GuardConfigError("at least one NVMe/TCP port is needed")
    if len(ports) > MAX_PORTS:
        raise GuardConfigError(f"at most {MAX_PORTS} NVMe/TCP ports, not {len(ports)}")
    return ports


def guarded_ports(nvme_ports: str | Iterable[object], move_port: int | None = MOVE_PORT) -> tuple[int, ...]:
    """Every port a guard keeps to the storage network: the NVMe/TCP ports and the agents' move
    port (a pod must not reach a move stream any more than a target). The agent, the node plugin
    and the lab tests that check what they installed all take it from here."""
    return parse_ports([*parse_ports(nvme_ports), *([move_port] if move_port else [])])


@dataclass(frozen=True)
class GuardSpec:
    role: Role
    network: Network
    ports: tuple[int, ...]


def guard_spec(role: Role | str, network: str | Network, ports: str | Iterable[object]) -> GuardSpec:
    """Every value checked here, before any of it can reach a ruleset or an argv."""
    try:
        r = role if isinstance(role, Role) else Role(str(role))
    except ValueError:
        raise GuardConfigError(f"guard role {role!r} is not one of {[x.value for x in Role]}") from None
    try:
        net = network if not isinstance(network, str) else parse_network(network)
    except StorageNetworkError as exc:
        raise GuardConfigError(str(exc)) from None
    return GuardSpec(r, net, parse_ports(ports))


@dataclass(frozen=True)
class Chain:
    name: str
    hook: str

    def shape(self) -> tuple[str, str, str, int, str]:
        return (self.name, "filter", self.hook, PRIORITY, "accept")


@dataclass(frozen=True)
class Rule:
    chain: str
    match: str  # nft match expression text, built only from validated values

    @property
    def comment(self) -> str:
        # The comment names the rule's content: a listing shows at once whether a rule in the
        # table is the one this version of zvolt would write.
        digest = hashlib.sha256(f"{self.chain}\0{self.match}".encode()).hexdigest()[:16]
        return COMMENT_PREFIX + digest

    def line(self) -> str:
        return f'{self.match} counter drop comment "{self.comment}"'


@dataclass(frozen=True)
class Fingerprint:
    """What a listing of the table must show: chains (name, type, hook, priority, policy) and
    rules in order (chain, comment, verdict, counted)."""

    chains: tuple[tuple[str, str, str, int, str], ...]
    rules: tuple[tuple[str, str, str, bool], ...]


@dataclass(frozen=True)
class Ruleset:
    family: str
    table: str
    chains: tuple[Chain, ...]
    rules: tuple[Rule, ...]

    def script(self) -> str:
        """`nft -f -` input: declare, delete and re-add the table in one transaction, so the
        result is the same whether or not (and however) the table existed before."""
        head = f"{self.family} {self.table}"
        out = [f"table {head}", f"delete table {head}", f"table {head} {{"]
        for chain in self.chains:
            out.append(f"\tchain {chain.name} {{")
            out.append(f"\t\ttype filter hook {chain.hook} priority {PRIORITY}; policy accept;")
            out.extend(f"\t\t{r.line()}" for r in self.rules if r.chain == chain.name)
            out.append("\t}")
        out.append("}")
        return "\n".join(out) + "\n"

    def expected(self) -> Fingerprint:
        return Fingerprint(
            chains=tuple(sorted(c.shape() for c in self.chains)),
            rules=tuple((r.chain, r.comment, "drop", True) for c in sorted(self.chains, key=lambda c: c.name)
                        for r in self.rules if r.chain == c.name),
        )


def _ports(ports: tuple[int, ...]) -> str:
    return str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(str(p) for p in ports) + " }"


def ruleset(spec: GuardSpec) -> Ruleset:
    ip = "ip" if spec.network.version == 4 else "ip6"
    other = "ipv6" if spec.network.version == 4 else "ipv4"
    ports = _ports(spec.ports)
    forward = Rule("forward", f"{ip} daddr {spec.network} tcp dport {ports}")
    if spec.role is Role.WORKER:
        return Ruleset(FAMILY, TABLES["worker"], (Chain("forward", "forward"),), (forward,))
    return Ruleset(
        FAMILY, TABLES["storage"], (Chain("input", "input"), Chain("forward", "forward")),
        (
            Rule("input", f"{ip} saddr != {spec.network} tcp dport {ports}"),
            Rule("input", f"meta nfproto {other} tcp dport {ports}"),
            forward,
        ),
    )


@dataclass(frozen=True)
class Observed:
    fingerprint: Fingerprint
    exprs: tuple[str, ...]  # each rule's expressions with counter values removed, as JSON
    dropped_packets: int


def observe(listing: Mapping[str, Any], rules: Ruleset) -> Observed:
    """Read `nft -j list table` output: the table's shape, its rules, the drop counters."""
    items = listing.get("nftables")
    if not isinstance(items, list):
        raise GuardConfigError("nft -j listing has no 'nftables' list")
    chains: list[tuple[str, str, str, int, str]] = []
    found: list[tuple[str, str, str, bool]] = []
    exprs: list[tuple[str, str]] = []
    dropped = 0

    def ours(obj: Mapping[str, Any]) -> bool:
        return obj.get("family") == rules.family and obj.get("table") == rules.table

    for item in items:
        if not isinstance(item, dict):
            continue
        chain = item.get("chain")
        if isinstance(chain, dict) and ours(chain):
            prio = chain.get("prio")
            chains.append((str(chain.get("name")), str(chain.get("type", "")), str(chain.get("hook", "")),
                           prio if isinstance(prio, int) else -(2**31), str(chain.get("policy", ""))))
        rule = item.get("rule")
        if isinstance(rule, dict) and ours(rule):
            expr = [e for e in rule.get("expr") or [] if isinstance(e, dict)]
            counters = [e["counter"] for e in expr if isinstance(e.get("counter"), dict)]
            dropped += sum(int(c.get("packets", 0)) for c in counters)
            verdict = next(iter(expr[-1]), "") if expr else ""
            name = str(rule.get("chain"))
            found.append((name, str(rule.get("comment", "")), verdict, bool(counters)))
            bare = [e for e in expr if "counter" not in e]
            exprs.append((name, json.dumps(bare, sort_keys=True)))
    # Rules in chain-name order, each chain's in its own order (the listing's chain order is
    # creation order, which says nothing about the rules' effect).
    order = {name: i for i, name in enumerate(sorted({r[0] for r in found}))}
    ranked = sorted(range(len(found)), key=lambda i: order[found[i][0]])
    return Observed(
        Fingerprint(tuple(sorted(chains)), tuple(found[i] for i in ranked)),
        tuple(exprs[i][1] for i in ranked),
        dropped,
    )
