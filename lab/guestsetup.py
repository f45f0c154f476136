"""Guest-side setup, sent to the guest's python3 in one ssh call (one round trip, not ~40).

Runs inside the guest with the standard library only: its source is read on the host and fed
to `python3 - <config-json>`. Every command is an argv list (no shell); every step is
idempotent, so a second `up` on a running guest changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

ZVOL_INHIBIT_DEV = "/sys/module/zfs/parameters/zvol_inhibit_dev"
IMPORT_TIMEOUT_S = 3 * 3600  # a kept 100,000-object pool after an unclean stop: ~10 min of objset cleanup alone


class SetupError(RuntimeError):
    pass


def sh(argv: list[str], *, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise SetupError(f"{argv} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def ok(argv: list[str]) -> bool:
    return sh(argv, check=False).returncode == 0


def zfs_param(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def report(msg: str) -> None:
    print(msg, flush=True)


def kernel(cfg: dict[str, Any]) -> None:
    sh(["modprobe", "-a", *cfg["modules"]], timeout=300)
    if not ok(["mountpoint", "-q", "/sys/kernel/config"]):
        sh(["mount", "-t", "configfs", "none", "/sys/kernel/config"])
    if not ok(["mountpoint", "-q", "/src"]):
        sh(["mount", "/src"], timeout=60)
    if not ok(["test", "-f", "/src/pyproject.toml"]):
        raise SetupError("/src does not hold the project tree (9p share missing?)")


def pool(cfg: dict[str, Any]) -> None:
    name, disk = cfg["pool"], cfg["pool_device"]
    if ok(["zpool", "list", "-H", "-o", "name", name]):
        return
    create = ["zpool", "create", "-o", "ashift=12", "-O", "compression=lz4", name, disk]
    if not cfg["pool_reused"]:
        sh([*create[:2], "-f", *create[2:]])
        report(f"pool {name} created on {disk}")
        return
    found = sh(["zpool", "import", "-d", "/dev"], check=False)
    if f"pool: {name}" in found.stdout:
        # An import owns every zvol to make its device node, even volmode=none ones that get none
        # (zvol_create_minors_recursive): over an hour for 20,000 zvols under TCG. Nothing needs
        # them at this point: the agent sets volmode=dev again on each published volume when it
        # starts, and that makes exactly those nodes. -N: mounting walks every dataset as well,
        # zvols included, and zvolt mounts nothing from the pool.
        zfs_param(ZVOL_INHIBIT_DEV, "1")
        try:
            sh(["zpool", "import", "-N", "-f", "-d", "/dev", name], timeout=IMPORT_TIMEOUT_S)
        finally:
            zfs_param(ZVOL_INHIBIT_DEV, "0")
        report(f"pool {name} imported from the kept disk (zvol device nodes left to the agent)")
    else:
        # A blank disk kept for reuse: make the pool once (no -f: never over another pool's labels).
        sh(create)
        report(f"pool {name} created on the kept disk")


def network(cfg: dict[str, Any]) -> None:
    have = set(sh(["ip", "netns", "list"]).stdout.split())
    for ns in (cfg["storage_ns"], cfg["worker_ns"]):
        if ns not in have:
            sh(["ip", "netns", "add", ns])
    if not ok(["ip", "-n", cfg["storage_ns"], "link", "show", cfg["storage_dev"]]):
        sh(["ip", "link", "add", cfg["storage_dev"], "netns", cfg["storage_ns"], "type", "veth",
            "peer", "name", cfg["worker_dev"], "netns", cfg["worker_ns"]])
    for ns, dev, ip in ((cfg["storage_ns"], cfg["storage_dev"], cfg["storage_ip"]),
                        (cfg["worker_ns"], cfg["worker_dev"], cfg["worker_ip"])):
        sh(["ip", "-n", ns, "addr", "replace", f"{ip}/{cfg['prefix_len']}", "dev", dev])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "-n", ns, "link", "set", dev, "up"])


def _by_mac(mac: str) -> str:
    """The root-netns interface with this MAC address, or ''."""
    for dev in sorted(os.listdir("/sys/class/net")):
        try:
            with open(f"/sys/class/net/{dev}/address") as f:
                if f.read().strip().lower() == mac:
                    return dev
        except OSError:
            continue
    return ""


def nic(cfg: dict[str, Any], what: str) -> None:
    """A NIC joining this guest to other lab guests (`what`: the peer link or the storage
    network): named, placed, addressed, routed."""
    p = cfg.get(what)
    if not p:
        return
    dev, ns = p["dev"], p["netns"]
    ip = ["ip", "-n", ns] if ns else ["ip"]
    if not ok([*ip, "link", "show", dev]):
        found = dev if ok(["ip", "link", "show", dev]) else _by_mac(p["mac"])
        if not found:
            raise SetupError(f"no network interface with MAC {p['mac']} ({what} missing?)")
        if found != dev:
            sh(["ip", "link", "set", found, "down"])
            sh(["ip", "link", "set", found, "name", dev])
        if ns:
            sh(["ip", "link", "set", dev, "netns", ns])
    sh([*ip, "addr", "replace", p["address"], "dev", dev])
    sh([*ip, "link", "set", dev, "up"])
    if p["route"]:
        sh([*ip, "route", "replace", p["route"][0], "via", p["route"][1]])
    report(f"{what} {dev} {p['address']} ({'netns ' + ns if ns else 'root netns'})")


def peer(cfg: dict[str, Any]) -> None:
    nic(cfg, "peer")


def storage_net(cfg: dict[str, Any]) -> None:
    nic(cfg, "storage_net")


def forwarders(cfg: dict[str, Any]) -> None:
    sh(["mkdir", "-p", cfg["run_dir"]])
    for unit, argv in cfg["forwarders"]:
        if ok(["systemctl", "is-active", "--quiet", unit]):
            continue
        sh(["systemctl", "reset-failed", unit], check=False)
        sh(argv)


def main(cfg: dict[str, Any]) -> None:
    kernel(cfg)
    pool(cfg)
    report(f"modules loaded, configfs and /src mounted, pool {cfg['pool']} online")
    network(cfg)
    peer(cfg)
    storage_net(cfg)
    forwarders(cfg)
    report(f"namespaces {cfg['storage_ns']} ({cfg['storage_ip']}) <-> {cfg['worker_ns']} ({cfg['worker_ip']}), "
           "forwarders up")


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except (SetupError, subprocess.TimeoutExpired) as exc:
        print(f"guest setup failed: {exc}", file=sys.stderr)
        sys.exit(1)
