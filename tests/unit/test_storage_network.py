"""The storage network: CIDR parsing, this node's addresses (`ip -j addr`, fake runner), the
one address the NVMe/TCP target listens on, and the agent's --storage-network/--nvme-listen."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import pytest

from agent.main import parse_settings, resolve_nvme_address
from zvolt.commands import Result
from zvolt.storagenet import (
    LocalAddress,
    StorageNetworkError,
    node_addresses,
    parse_ip_addr_json,
    parse_network,
    pick_address,
)

# `ip -j -4 addr show` on a storage node: loopback, the primary (pod-reachable) address, the
# storage network, and an empty entry as older iproute2 prints for links without IPv4.
IP_J_4 = """[{},{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"addr_info":[{"family":
"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo"}]},{"ifindex":2,"ifname":"eth0","addr_info":[{
"family":"inet","local":"192.0.2.2","prefixlen":24,"scope":"global","label":"eth0"}]},{"ifindex":3,"link":"vb",
"ifname":"eth1","addr_info":[{"family":"inet","local":"10.42.0.1","prefixlen":24,"scope":"global","label":"eth1"},
{"family":"inet","local":"10.42.0.9","prefixlen":24,"scope":"global","secondary":true,"label":"eth1"}]}]"""


def addrs(*pairs: tuple[str, str]) -> list[LocalAddress]:
    return [LocalAddress(i, ipaddress.ip_address(a)) for i, a in pairs]


def test_parse_network() -> None:
    assert str(parse_network(" 10.42.0.0/24 ")) == "10.42.0.0/24"
    assert str(parse_network("fd00:42::/64")) == "fd00:42::/64"
    for bad, why in [("10.42.0.1/24", "host bits set; the network is 10.42.0.0/24"), ("10.42.0.0", "not a CIDR"),
                     ("eth1", "not a CIDR"), ("10.42.0.0/24,10.43.0.0/24", "not a CIDR")]:
        with pytest.raises(StorageNetworkError, match=why):
            parse_network(bad)


def test_node_addresses_runs_ip_json_and_parses_it() -> None:
    calls: list[list[str]] = []

    def runner(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30.0) -> Result:
        calls.append(list(argv))
        return Result(0, IP_J_4, "")

    got = node_addresses(4, runner)
    assert calls == [["ip", "-j", "-4", "addr", "show"]]
    assert got == addrs(("lo", "127.0.0.1"), ("eth0", "192.0.2.2"), ("eth1", "10.42.0.1"), ("eth1", "10.42.0.9"))
    with pytest.raises(ValueError):
        node_addresses(5, runner)

    def failing(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30.0) -> Result:
        return Result(1, "", "Cannot open netlink socket: Permission denied\n")

    with pytest.raises(StorageNetworkError, match=re.escape("ip exit 1): Cannot open netlink socket")):
        node_addresses(4, failing)
    with pytest.raises(StorageNetworkError, match="unreadable"):
        parse_ip_addr_json("{not json")
    assert parse_ip_addr_json("") == [] and parse_ip_addr_json('[{"addr_info":[{"local":"x"}]}]') == []


def test_pick_exactly_one_address() -> None:
    net = parse_network("10.42.0.0/24")
    found = parse_ip_addr_json(IP_J_4)
    with pytest.raises(StorageNetworkError, match=re.escape("several addresses in the storage network 10.42.0.0/24: "
                       "10.42.0.1 (eth1), 10.42.0.9 (eth1); give --nvme-listen")):
        pick_address(net, found)
    assert str(pick_address(net, found[:3])) == "10.42.0.1"
    # The same address on two links (e.g. a bond's members) is still one address.
    assert str(pick_address(net, addrs(("a", "10.42.0.5"), ("b", "10.42.0.5")))) == "10.42.0.5"
    with pytest.raises(StorageNetworkError, match=re.escape("no address in the storage network 10.43.0.0/24 (its "
                       "IPv4 addresses: 127.0.0.1 (lo), 192.0.2.2 (eth0))")):
        pick_address(parse_network("10.43.0.0/24"), found[:2])
    with pytest.raises(StorageNetworkError, match="addresses: none"):
        pick_address(net, [])


# --- the agent's settings ------------------------------------------------------------------------

BASE = ["--node-name", "storage-0", "--pool", "tank", "--insecure"]


def test_storage_network_alone_picks_the_address_at_start() -> None:
    s = parse_settings([*BASE, "--storage-network", "10.42.0.0/24"], env={})
    assert (s.storage_network, s.nvme_address, s.nvme_port, s.guard) == ("10.42.0.0/24", "", "4420", True)
    assert s.guard_interval == 30
    picked = resolve_nvme_address(s, lambda version: addrs(("eth0", "192.0.2.2"), ("eth1", "10.42.0.1")))
    assert (picked.nvme_address, picked.nvme_port) == ("10.42.0.1", "4420")
    with pytest.raises(StorageNetworkError, match="no address in the storage network"):
        resolve_nvme_address(s, lambda version: addrs(("eth0", "192.0.2.2")))


def test_storage_network_from_the_environment() -> None:
    s = parse_settings(BASE, env={"ZVOLT_STORAGE_NETWORK": "10.42.0.0/24", "ZVOLT_NVME_PORT": "4421",
                                  "ZVOLT_GUARD_INTERVAL": "5"})
    assert (s.storage_network, s.nvme_port, s.guard_interval) == ("10.42.0.0/24", "4421", 5)


def test_nvme_listen_still_works_and_is_checked_against_the_network() -> None:
    lab = parse_settings([*BASE, "--nvme-listen", "10.42.0.1:4420"], env={})
    assert (lab.nvme_address, lab.nvme_port, lab.storage_network, lab.guard) == ("10.42.0.1", "4420", "", False)
    assert resolve_nvme_address(lab, lambda version: []) is lab  # nothing to look up
    both = parse_settings([*BASE, "--nvme-listen", "10.42.0.1:4420", "--storage-network", "10.42.0.0/24"], env={})
    assert (both.nvme_address, both.storage_network, both.guard) == ("10.42.0.1", "10.42.0.0/24", True)
    off = parse_settings([*BASE, "--storage-network", "10.42.0.0/24", "--no-guard"], env={})
    assert off.guard is False


@pytest.mark.parametrize(("argv", "complaint"), [
    (BASE, "--storage-network CIDR (or --nvme-listen IP:PORT)"),
    ([*BASE, "--storage-network", "10.42.0.1/24"], "host bits set"),
    ([*BASE, "--storage-network", "10.42.0.0/24", "--nvme-listen", "192.0.2.2:4420"], "not in --storage-network"),
    ([*BASE, "--storage-network", "10.42.0.0/24", "--nvme-listen", "storage-0:4420"], "not in --storage-network"),
    ([*BASE, "--nvme-listen", "10.42.0.1:4420", "--nvme-port", "4421"], "name different ports"),
    ([*BASE, "--storage-network", "10.42.0.0/24", "--nvme-port", "70000"], "outside 1-65535"),
    ([*BASE, "--storage-network", "10.42.0.0/24", "--guard-interval", "0.5"], "at least 1 second"),
])
def test_bad_storage_network_settings_refuse_to_start(argv: list[str], complaint: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv, env={})
    assert complaint in capsys.readouterr().err
