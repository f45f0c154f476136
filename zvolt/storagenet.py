"""The storage network the operator names (`--storage-network CIDR`): parse it, list this
node's own addresses, and pick the one inside it for the NVMe/TCP target to listen on.

Listening on the storage network (not on the node's primary address, which every pod can
route to) is half of keeping pods away from NVMe/TCP; zvolt/nftguard.py is the other half.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass

from zvolt.commands import Runner, subprocess_runner

# The agents' move port (agent/moves.py): target agents fetch a moving volume's stream there.
# Both guards keep it to the storage network like the NVMe/TCP port (zvolt/nftguard.py).
MOVE_PORT = 7011

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class StorageNetworkError(ValueError):
    """The storage network setting is malformed, or this node has no single address in it."""


def parse_network(text: str) -> Network:
    """A CIDR, strictly: host bits set is refused (the operator may have meant either side)."""
    raw = str(text).strip()
    if "/" not in raw:
        raise StorageNetworkError(f"storage network {text!r} is not a CIDR (e.g. 10.42.0.0/24)")
    try:
        return ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise StorageNetworkError(f"storage network {text!r} is not a CIDR: {exc}") from None
        raise StorageNetworkError(f"storage network {text!r} has host bits set; the network is {loose}") from None


@dataclass(frozen=True)
class LocalAddress:
    interface: str
    address: Address


def node_addresses(version: int, runner: Runner = subprocess_runner) -> list[LocalAddress]:
    """This network namespace's addresses of one IP version, from `ip -j addr show`."""
    if version not in (4, 6):
        raise ValueError(f"IP version must be 4 or 6, not {version!r}")
    argv = ["ip", "-j", f"-{version}", "addr", "show"]
    res = runner(argv, timeout=15)
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise StorageNetworkError(f"cannot list this node's addresses (ip exit {res.returncode}): "
                                  f"{lines[-1] if lines else 'no output'}")
    return parse_ip_addr_json(res.stdout)


def parse_ip_addr_json(text: str) -> list[LocalAddress]:
    try:
        links = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise StorageNetworkError(f"unreadable `ip -j addr` output: {exc}") from None
    out: list[LocalAddress] = []
    for link in links if isinstance(links, list) else []:
        if not isinstance(link, dict):
            continue
        # `ip -j -4` lists links without an address of that family with empty entries: skip them.
        for info in link.get("addr_info") or []:
            if isinstance(info, dict) and info.get("local"):
                try:
                    out.append(LocalAddress(str(link.get("ifname", "?")), ipaddress.ip_address(info["local"])))
                except ValueError:
                    continue
    return out


def pick_address(network: Network, addresses: Iterable[LocalAddress]) -> Address:
    """The node's one address inside `network`; none or several is a configuration error that
    must stop the agent (listening on a guess could expose the target on the wrong network)."""
    seen = list(addresses)
    inside: dict[Address, list[str]] = {}
    for a in seen:
        if a.address.version == network.version and a.address in network:
            inside.setdefault(a.address, []).append(a.interface)
    if len(inside) == 1:
        return next(iter(inside))
    if not inside:
        have = ", ".join(f"{a.address} ({a.interface})" for a in seen) or "none"
        raise StorageNetworkError(f"this node has no address in the storage network {network} "
                                  f"(its IPv{network.version} addresses: {have})")
    several = ", ".join(f"{ip} ({'/'.join(ifs)})" for ip, ifs in sorted(inside.items(), key=lambda kv: kv[0]))
    raise StorageNetworkError(f"this node has several addresses in the storage network {network}: {several}; "
                              "give --nvme-listen IP:PORT to choose one")
