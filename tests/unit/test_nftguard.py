"""The NVMe/TCP guard: exact rules per role, validation, the nft adapter (fake runner), the
keeper (re-applies a flushed table), the wiring in the agent and the node plugin, and once
against real nft in a private network namespace when this machine allows one."""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from zvolt import guardkeeper
from zvolt.commands import CommandError, Result
from zvolt.guardkeeper import GuardError, GuardKeeper, GuardMetrics
from zvolt.nft import Nft, NftError
from zvolt.nftguard import GuardConfigError, GuardSpec, Role, guard_spec, observe, parse_ports, ruleset

NET = "10.42.0.0/24"
REPO = Path(__file__).resolve().parents[2]

# `nft -j list table` as nft 1.0.6 (Debian bookworm, the image's and the lab's) printed it for
# guard_spec("worker"/"storage", "10.42.0.0/24", "4420") right after applying it.
REAL_WORKER = json.loads("""{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5",
"json_schema_version": 1}}, {"table": {"family": "inet", "name": "zvolt_guard_worker", "handle": 2}}, {"chain":
{"family": "inet", "table": "zvolt_guard_worker", "name": "forward", "handle": 1, "type": "filter", "hook": "forward",
"prio": -10, "policy": "accept"}}, {"rule": {"family": "inet", "table": "zvolt_guard_worker", "chain": "forward",
"handle": 2, "comment": "zvolt-guard:942bcbceb687d7bf", "expr": [{"match": {"op": "==", "left": {"payload":
{"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.42.0.0", "len": 24}}}}, {"match": {"op":
"==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 4420}}, {"counter": {"packets": 0,
"bytes": 0}}, {"drop": null}]}}]}""")
REAL_STORAGE = json.loads("""{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5",
"json_schema_version": 1}}, {"table": {"family": "inet", "name": "zvolt_guard_storage", "handle": 4}}, {"chain":
{"family": "inet", "table": "zvolt_guard_storage", "name": "input", "handle": 1, "type": "filter", "hook": "input",
"prio": -10, "policy": "accept"}}, {"chain": {"family": "inet", "table": "zvolt_guard_storage", "name": "forward",
"handle": 2, "type": "filter", "hook": "forward", "prio": -10, "policy": "accept"}}, {"rule": {"family": "inet",
"table": "zvolt_guard_storage", "chain": "input", "handle": 3, "comment": "zvolt-guard:847901518ef367d2", "expr":
[{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr":
"10.42.0.0", "len": 24}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
"right": 4420}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}, {"rule": {"family": "inet", "table":
"zvolt_guard_storage", "chain": "input", "handle": 4, "comment": "zvolt-guard:4d788bf90836e6f6", "expr": [{"match":
{"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}}, {"match": {"op": "==", "left": {"payload":
{"protocol": "tcp", "field": "dport"}}, "right": 4420}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}},
{"rule": {"family": "inet", "table": "zvolt_guard_storage", "chain": "forward", "handle": 5, "comment":
"zvolt-guard:942bcbceb687d7bf", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field":
"daddr"}}, "right": {"prefix": {"addr": "10.42.0.0", "len": 24}}}}, {"match": {"op": "==", "left": {"payload":
{"protocol": "tcp", "field": "dport"}}, "right": 4420}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop":
null}]}}]}""")


# --- the rules --------------------------------------------------------------------------------

def test_worker_rules_exactly() -> None:
    rs = ruleset(guard_spec("worker", NET, "4420"))
    assert (rs.family, rs.table) == ("inet", "zvolt_guard_worker")
    assert rs.script() == (
        "table inet zvolt_guard_worker\n"
        "delete table inet zvolt_guard_worker\n"
        "table inet zvolt_guard_worker {\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority -10; policy accept;\n"
        '\t\tip daddr 10.42.0.0/24 tcp dport 4420 counter drop comment "zvolt-guard:942bcbceb687d7bf"\n'
        "\t}\n"
        "}\n"
    )
    # Forward only: the worker's own kernel initiator sends through output, never touched.
    assert "output" not in rs.script() and "input" not in rs.script()


def test_storage_rules_exactly() -> None:
    rs = ruleset(guard_spec(Role.STORAGE, NET, [4420, "8009", 4420]))
    assert rs.table == "zvolt_guard_storage"
    assert rs.script() == (
        "table inet zvolt_guard_storage\n"
        "delete table inet zvolt_guard_storage\n"
        "table inet zvolt_guard_storage {\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority -10; policy accept;\n"
        f'\t\tip saddr != 10.42.0.0/24 tcp dport {{ 4420, 8009 }} counter drop comment "{rs.rules[0].comment}"\n'
        f'\t\tmeta nfproto ipv6 tcp dport {{ 4420, 8009 }} counter drop comment "{rs.rules[1].comment}"\n'
        "\t}\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority -10; policy accept;\n"
        f'\t\tip daddr 10.42.0.0/24 tcp dport {{ 4420, 8009 }} counter drop comment "{rs.rules[2].comment}"\n'
        "\t}\n"
        "}\n"
    )
    assert "log" not in rs.script().replace("policy", "")  # log-free: a flood must not flood the journal


def test_ipv6_storage_network() -> None:
    rs = ruleset(guard_spec("storage", "fd00:42::/64", "4420"))
    assert [r.match for r in rs.rules] == [
        "ip6 saddr != fd00:42::/64 tcp dport 4420", "meta nfproto ipv4 tcp dport 4420",
        "ip6 daddr fd00:42::/64 tcp dport 4420"]


def test_comments_name_the_rule_content() -> None:
    a = ruleset(guard_spec("worker", NET, "4420")).rules[0]
    b = ruleset(guard_spec("worker", "10.43.0.0/24", "4420")).rules[0]
    c = ruleset(guard_spec("worker", NET, "4421")).rules[0]
    assert len({a.comment, b.comment, c.comment}) == 3 and a.comment.startswith("zvolt-guard:")


@pytest.mark.parametrize(("network", "ports", "complaint"), [
    ("10.42.0.1/24", "4420", "host bits set; the network is 10.42.0.0/24"),
    ("10.42.0.0", "4420", "not a CIDR"),
    ("10.42.0.0/33", "4420", "not a CIDR"),
    ("10.42.0.0/24; flush ruleset", "4420", "not a CIDR"),
    ('10.42.0.0/24" accept', "4420", "not a CIDR"),
    ("", "4420", "not a CIDR"),
    (NET, "0", "outside 1-65535"),
    (NET, "65536", "outside 1-65535"),
    (NET, "4420 accept", "not a port number"),
    (NET, "4420,-1", "not a port number"),
    (NET, "", "not a port number"),
    (NET, "٤٤٢٠", "not a port number"),  # Arabic-Indic digits: isdigit() but not a port
    (NET, ",".join(str(p) for p in range(4000, 4017)), "at most 16"),
])
def test_values_are_checked_before_any_ruleset(network: str, ports: str, complaint: str) -> None:
    with pytest.raises(GuardConfigError, match=complaint):
        guard_spec("worker", network, ports)


def test_ports_and_roles() -> None:
    assert parse_ports("4420, 8009,4420") == (4420, 8009)
    assert parse_ports([4420]) == (4420,)
    with pytest.raises(GuardConfigError):
        parse_ports([True])
    with pytest.raises(GuardConfigError):
        parse_ports([])
    with pytest.raises(GuardConfigError, match="role"):
        guard_spec("controller", NET, "4420")
    spec = guard_spec("worker", ipaddress.ip_network(NET), (4420,))
    assert spec == GuardSpec(Role.WORKER, ipaddress.ip_network(NET), (4420,))


# --- reading nft's listing ----------------------------------------------------------------------

@pytest.mark.parametrize(("role", "listing"), [("worker", REAL_WORKER), ("storage", REAL_STORAGE)])
def test_a_real_listing_matches_what_was_written(role: str, listing: dict[str, Any]) -> None:
    rs = ruleset(guard_spec(role, NET, "4420"))
    seen = observe(listing, rs)
    assert seen.fingerprint == rs.expected() and seen.dropped_packets == 0
    assert len(seen.exprs) == len(rs.rules)


def tampered(listing: dict[str, Any], change: str) -> dict[str, Any]:
    out = copy.deepcopy(listing)
    items = out["nftables"]
    rules = [i for i in items if "rule" in i]
    if change == "flushed":
        out["nftables"] = [i for i in items if "rule" not in i]
    elif change == "accept-first":
        first = copy.deepcopy(rules[0])
        first["rule"].update(handle=99, comment="", expr=[{"accept": None}])
        items.insert(items.index(rules[0]), first)
    elif change == "priority-changed":
        next(i for i in items if "chain" in i)["chain"]["prio"] = 100
    elif change == "counter-removed":
        rules[0]["rule"]["expr"] = [e for e in rules[0]["rule"]["expr"] if "counter" not in e]
    elif change == "verdict-accept":
        rules[0]["rule"]["expr"][-1] = {"accept": None}
    return out


@pytest.mark.parametrize("change", ["flushed", "accept-first", "priority-changed", "counter-removed",
                                    "verdict-accept"])
def test_a_tampered_table_does_not_match(change: str) -> None:
    rs = ruleset(guard_spec("storage", NET, "4420"))
    assert observe(tampered(REAL_STORAGE, change), rs).fingerprint != rs.expected()


def test_dropped_packets_come_from_the_rule_counters() -> None:
    listing = copy.deepcopy(REAL_STORAGE)
    for n, item in enumerate(i for i in listing["nftables"] if "rule" in i):
        next(e for e in item["rule"]["expr"] if "counter" in e)["counter"]["packets"] = 10 ** n
    seen = observe(listing, ruleset(guard_spec("storage", NET, "4420")))
    assert seen.dropped_packets == 111
    # Counter values are not part of what must stay the same.
    assert seen.exprs == observe(REAL_STORAGE, ruleset(guard_spec("storage", NET, "4420"))).exprs


def test_other_tables_in_the_listing_are_ignored() -> None:
    listing = copy.deepcopy(REAL_WORKER)
    stranger = copy.deepcopy(next(i for i in listing["nftables"] if "rule" in i))
    stranger["rule"]["table"] = "firewalld"
    listing["nftables"].append(stranger)
    rs = ruleset(guard_spec("worker", NET, "4420"))
    assert observe(listing, rs).fingerprint == rs.expected()
    with pytest.raises(GuardConfigError):
        observe({"nope": []}, rs)


# --- the adapter ------------------------------------------------------------------------------

@dataclass
class RecordingRunner:
    results: list[Result]
    calls: list[tuple[list[str], str | None]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30.0) -> Result:
        self.calls.append((list(argv), stdin))
        return self.results.pop(0)


def test_apply_sends_the_ruleset_on_stdin_of_an_argv_list() -> None:
    runner = RecordingRunner([Result(0, "", "")])
    script = ruleset(guard_spec("worker", NET, "4420")).script()
    Nft(runner).apply(script)
    assert runner.calls == [(["nft", "-f", "-"], script)]


def test_apply_failure_names_nft_first_line() -> None:
    runner = RecordingRunner([Result(1, "", "Error: Could not process rule: Operation not permitted\nquoted input\n")])
    with pytest.raises(NftError, match=re.escape("exit 1): Error: Could not process rule: Operation not permitted")):
        Nft(runner).apply("table inet x\n")
    with pytest.raises(NftError, match="NUL"):
        Nft(RecordingRunner([])).apply("table inet x\0")


def test_list_table() -> None:
    runner = RecordingRunner([Result(0, json.dumps(REAL_WORKER), ""),
                              Result(1, "", "Error: No such file or directory\nlist table inet zvolt_guard_worker\n"),
                              Result(1, "", "Error: Operation not permitted\n"),
                              Result(0, "not json", ""),
                              Result(0, "[]", "")])
    nft = Nft(runner)
    assert nft.list_table("inet", "zvolt_guard_worker") == REAL_WORKER
    assert runner.calls[0] == (["nft", "-j", "list", "table", "inet", "zvolt_guard_worker"], None)
    assert nft.list_table("inet", "zvolt_guard_worker") is None
    for _ in range(3):
        with pytest.raises(NftError):
            nft.list_table("inet", "zvolt_guard_worker")


@pytest.mark.parametrize(("family", "table"), [("bridge", "zvolt"), ("inet", "Zvolt"), ("inet", "a b"),
                                               ("inet", "x;flush"), ("inet", "-j"), ("inet", "a" * 33)])
def test_list_table_refuses_odd_names_before_running_anything(family: str, table: str) -> None:
    runner = RecordingRunner([])
    with pytest.raises(NftError):
        Nft(runner).list_table(family, table)
    assert runner.calls == []


# --- the keeper -------------------------------------------------------------------------------

class FakeKernel:
    """nft as a runner: remembers which table listing the last applied ruleset produces
    (nft 1.0.6's real output for these rules), and lets a test flush or delete it."""

    def __init__(self, listing: dict[str, Any]) -> None:
        self.written = listing
        self.tables: dict[str, dict[str, Any]] = {}
        self.applied: list[str] = []

    def __call__(self, argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30.0) -> Result:
        if list(argv) == ["nft", "-f", "-"]:
            assert stdin is not None
            self.applied.append(stdin)
            self.tables[self.name] = copy.deepcopy(self.written)
            return Result(0, "", "")
        if list(argv[:4]) == ["nft", "-j", "list", "table"]:
            if argv[5] not in self.tables:
                return Result(1, "", "Error: No such file or directory\n")
            return Result(0, json.dumps(self.tables[argv[5]]), "")
        raise AssertionError(f"unexpected argv {argv}")

    @property
    def name(self) -> str:
        return str(next(i for i in self.written["nftables"] if "table" in i)["table"]["name"])

    def flush(self) -> None:
        self.tables[self.name] = tampered(self.written, "flushed")

    def delete(self) -> None:
        self.tables.pop(self.name)


def sample(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


def test_keeper_reapplies_after_a_flush_and_a_delete(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="zvolt.guard")  # other tests may have raised the root level
    kernel = FakeKernel(REAL_WORKER)
    registry = CollectorRegistry()
    keeper = GuardKeeper(ruleset(guard_spec("worker", NET, "4420")), Nft(kernel), GuardMetrics(registry, "zvolt_x"))
    keeper.apply()
    assert len(kernel.applied) == 1 and sample(registry, "zvolt_x_guard_installed") == 1
    assert keeper.check() is False and len(kernel.applied) == 1  # intact: nothing done

    kernel.flush()
    assert keeper.check() is True and len(kernel.applied) == 2
    assert "NVMe/TCP guard was changed: re-applying" in caplog.text
    kernel.delete()
    assert keeper.check() is True and len(kernel.applied) == 3
    assert "NVMe/TCP guard was missing: re-applying" in caplog.text
    assert keeper.check() is False
    assert keeper.reapplied == 2 and sample(registry, "zvolt_x_guard_reapplied_total") == 2
    assert kernel.applied == [keeper.rules.script()] * 3


def test_keeper_notices_an_edit_that_keeps_the_comments() -> None:
    kernel = FakeKernel(REAL_WORKER)
    keeper = GuardKeeper(ruleset(guard_spec("worker", NET, "4420")), Nft(kernel))
    keeper.apply()
    rule = next(i for i in kernel.tables["zvolt_guard_worker"]["nftables"] if "rule" in i)["rule"]
    rule["expr"][1]["match"]["right"] = 1  # someone moved the drop to port 1, comment kept
    assert keeper.check() is True


def test_keeper_reports_drops() -> None:
    kernel = FakeKernel(REAL_WORKER)
    registry = CollectorRegistry()
    keeper = GuardKeeper(ruleset(guard_spec("worker", NET, "4420")), Nft(kernel), GuardMetrics(registry, "zvolt_x"))
    keeper.apply()
    next(e for i in kernel.tables["zvolt_guard_worker"]["nftables"] if "rule" in i
         for e in i["rule"]["expr"] if "counter" in e)["counter"]["packets"] = 7
    assert keeper.check() is False and sample(registry, "zvolt_x_guard_dropped_packets") == 7


def test_apply_that_lists_differently_is_an_error() -> None:
    kernel = FakeKernel(REAL_WORKER)  # a worker's listing, but the keeper writes the storage table
    with pytest.raises(GuardError, match=r"cannot read|lists it differently"):
        GuardKeeper(ruleset(guard_spec("storage", NET, "4420")), Nft(kernel)).apply()
    kernel2 = FakeKernel(REAL_WORKER)
    with pytest.raises(GuardError, match="lists it differently"):
        GuardKeeper(ruleset(guard_spec("worker", NET, "4421")), Nft(kernel2)).apply()


def test_no_nft_is_a_guard_error() -> None:
    def missing(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30.0) -> Result:
        raise CommandError("nft is not installed (not found on PATH)")

    with pytest.raises(GuardError, match="cannot install table inet zvolt_guard_worker: nft is not installed"):
        guardkeeper.install(guard_spec("worker", NET, "4420"), nft=Nft(missing))


def test_run_loop_reapplies_and_survives_errors() -> None:
    kernel = FakeKernel(REAL_WORKER)
    keeper = GuardKeeper(ruleset(guard_spec("worker", NET, "4420")), Nft(kernel), interval=0.01)
    keeper.apply()
    kernel.delete()
    stop = threading.Event()
    worker = threading.Thread(target=keeper.run, args=(stop,))
    worker.start()
    try:
        for _ in range(500):
            if keeper.reapplied:
                break
            stop.wait(0.01)
    finally:
        stop.set()
        worker.join(5)
    assert keeper.reapplied >= 1 and "zvolt_guard_worker" in kernel.tables


def test_install_applies_then_keeps_from_a_thread() -> None:
    kernel = FakeKernel(REAL_WORKER)
    stop = threading.Event()
    registry = CollectorRegistry()
    try:
        keeper = guardkeeper.install(guard_spec("worker", NET, "4420"), registry=registry, prefix="zvolt_y",
                                     interval=1, nft=Nft(kernel), stop=stop)
        assert len(kernel.applied) == 1 and keeper.interval == 1
        assert any(t.name == "nft-guard" for t in threading.enumerate())
        assert sample(registry, "zvolt_y_guard_installed") == 1
    finally:
        stop.set()
    with pytest.raises(GuardError, match="interval"):
        guardkeeper.install(guard_spec("worker", NET, "4420"), interval=0.5, nft=Nft(kernel))


# --- wiring: the node plugin and the agent -----------------------------------------------------

def node_args(*extra: str) -> argparse.Namespace:
    from csi.main import parser

    return parser().parse_args(["--mode", "node", "--node-id", "worker-0", *extra])


def test_node_plugin_installs_the_worker_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    from csi import main as csi_main
    from csi.metrics import Metrics

    calls: list[tuple[GuardSpec, dict[str, Any]]] = []
    monkeypatch.setattr(guardkeeper, "install", lambda spec, **kw: calls.append((spec, kw)))
    csi_main.node_guard(node_args("--storage-network", NET, "--nvme-port", "4420,8009", "--guard-interval", "5"),
                        Metrics("node"))
    [(spec, kw)] = calls
    assert spec == GuardSpec(Role.WORKER, ipaddress.ip_network(NET), (4420, 7011, 8009))
    assert kw["prefix"] == "zvolt_csi_node" and kw["interval"] == 5

    calls.clear()
    csi_main.node_guard(node_args("--no-guard"), Metrics("node"))
    assert calls == []
    with pytest.raises(SystemExit, match="needs --storage-network CIDR"):
        csi_main.node_guard(node_args(), Metrics("node"))
    with pytest.raises(SystemExit, match="host bits set"):
        csi_main.node_guard(node_args("--storage-network", "10.42.0.1/24"), Metrics("node"))
    with pytest.raises(SystemExit, match="outside 1-65535"):
        csi_main.node_guard(node_args("--storage-network", NET, "--nvme-port", "0"), Metrics("node"))


def test_agent_installs_the_storage_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import main as agent_main
    from agent.metrics import Metrics

    calls: list[tuple[GuardSpec, dict[str, Any]]] = []
    monkeypatch.setattr(guardkeeper, "install", lambda spec, **kw: calls.append((spec, kw)))
    base = ["--node-name", "storage-0", "--pool", "tank", "--insecure"]
    settings = agent_main.parse_settings([*base, "--storage-network", NET, "--nvme-port", "4421"], env={})
    agent_main.start_guard(settings, Metrics())
    [(spec, kw)] = calls
    # The TLS port (default: the NVMe/TCP port + 1) and the move port (agent/moves.py, default
    # 7011) are kept to the storage network as well.
    assert spec == GuardSpec(Role.STORAGE, ipaddress.ip_network(NET), (4421, 4422, 7011))
    assert kw["prefix"] == "zvolt_agent" and kw["interval"] == 30
    calls.clear()
    for moves, tls, ports in (("off", "4422", (4421, 4422)), ("10.42.0.1:7100", "4500", (4421, 4500, 7100))):
        argv = [*base, "--storage-network", NET, "--nvme-port", "4421", "--move-listen", moves, "--nvme-tls-port", tls]
        agent_main.start_guard(agent_main.parse_settings(argv, env={}), Metrics())
        assert calls.pop()[0].ports == ports
    calls.clear()
    for argv in ([*base, "--storage-network", NET, "--no-guard"], [*base, "--nvme-listen", "10.42.0.1:4420"]):
        agent_main.start_guard(agent_main.parse_settings(argv, env={}), Metrics())
    assert calls == []


# --- real nft, in a network namespace of its own ----------------------------------------------

REAL_NFT = """
import json, subprocess, sys
from zvolt.guardkeeper import GuardKeeper
from zvolt.nft import Nft
from zvolt.nftguard import guard_spec, ruleset
out = {}
for role in ("worker", "storage"):
    keeper = GuardKeeper(ruleset(guard_spec(role, "10.42.0.0/24", "4420")), Nft())
    keeper.apply()
    keeper.apply()  # idempotent: delete + add in one transaction
    intact = keeper.check()
    subprocess.run(["nft", "flush", "table", "inet", keeper.rules.table], check=True)
    flushed = keeper.check()
    subprocess.run(["nft", "flush", "ruleset"], check=True)
    wiped = keeper.check()
    out[role] = [intact, flushed, wiped, keeper.check()]
print(json.dumps(out))
"""


def test_real_nft_in_a_private_network_namespace() -> None:
    """nft 1.0.x really accepts the ruleset, lists it as the keeper expects, and a flush is
    repaired. Runs only where nft is installed and an unprivileged user+net namespace can be
    made (this never touches the machine's own firewall)."""
    unshare = shutil.which("unshare")
    if not shutil.which("nft") or not unshare:
        pytest.skip("needs nft and unshare on this machine")
    probe = subprocess.run([unshare, "--user", "--map-root-user", "--net", "nft", "list", "ruleset"],
                           capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no private network namespace with nftables here: {probe.stderr.strip()}")
    proc = subprocess.run([unshare, "--user", "--map-root-user", "--net", sys.executable, "-c", REAL_NFT],
                          capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"worker": [False, True, True, False], "storage": [False, True, True, False]}
