"""zvolt-agent: flags / env (ZVOLT_<FLAG>) / JSON config file -> a running agent.

Precedence: command line, then environment, then the --config file, then defaults. The gRPC
server starts at once (GetInfo answers ready=false); recovery runs in the background and every
other call gets UNAVAILABLE until it is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from agent import certrequest, nvmet
from agent.authz import Authorizer
from agent.dhchap import AuthConfig, HostKeys
from agent.exports import ExportConfig, Exports
from agent.failpoints import FailpointZfs
from agent.index import Index, IndexCorrupt, IndexTooNew
from agent.keys import Keys
from agent.keystore import KeyStore, KeyStoreError, read_wrapping_key
from agent.locks import VolumeLocks
from agent.metrics import Metrics
from agent.moves import DEFAULT_MOVE_PORT, Moves, SendServer, tls_contexts
from agent.recovery import Readiness, Recovery
from agent.server import AgentServicer, make_server
from agent.shutdown import drain
from agent.usage import MIN_CYCLE, Usage
from agent.volumes import AgentConfig, Volumes
from agent.zfs import LibZfs, Streams, Zfs
from agent.zpool import Zpool
from zvolt import commitment, guardkeeper, names
from zvolt.errors import ZvoltError
from zvolt.guardkeeper import GuardError
from zvolt.keyring import KernelKeyring
from zvolt.logs import setup_logging
from zvolt.nftguard import GuardConfigError, Role, guard_spec, guarded_ports, parse_port
from zvolt.rpc import InFlight, parse_endpoint, prepare_unix_socket
from zvolt.storagenet import StorageNetworkError, node_addresses, parse_network, pick_address
from zvolt.tlsfiles import TlsFiles, Watched, server_credentials

_log = logging.getLogger("zvolt.agent")

# flag -> (default, help)
_OPTIONS: dict[str, tuple[str | None, str]] = {
    "node-name": (None, "storage node name (prefix of CSI ids, part of NQNs)"),
    "pool": (None, "ZFS pool"),
    "parent": (None, "parent dataset owned by zvolt (default POOL/zvolt)"),
    "listen": ("0.0.0.0:7001", "gRPC address: unix:///path or host:port"),
    "storage-network": (None, "CIDR of the storage network: the NVMe/TCP target listens on this node's one "
                        "address in it, and an nftables guard keeps every other source off the port"),
    "nvme-listen": (None, "NVMe/TCP listener IP:PORT (labs; default: this node's address in --storage-network)"),
    "nvme-port": (None, "NVMe/TCP port (default 4420, or the port of --nvme-listen)"),
    "nvme-tls-port": (None, "NVMe/TCP port, on the same address, of the volumes published with a TLS PSK: it "
                      "requires TLS 1.3 (tlshd must run on this node; default: the NVMe/TCP port + 1, so 4421)"),
    "guard-interval": (str(guardkeeper.DEFAULT_INTERVAL), "seconds between checks that the nftables guard is intact"),
    "metrics-listen": ("0.0.0.0:9101", "Prometheus HOST:PORT ('' disables)"),
    "state-dir": ("/var/lib/zvolt", "directory of the persistent index"),
    "tls-cert": (None, "server certificate (PEM)"),
    "tls-key": (None, "server key (PEM)"),
    "tls-ca": (None, "CA that signs client certificates (mTLS)"),
    "tls-request-hours": ("168", "with --tls-request: lifetime asked for this node's certificate (renewed at 2/3)"),
    "controller-cn": ("zvolt-controller", "Common Name of the controller's client certificate: the only caller "
                      "that may change anything (others from the CA may only call GetInfo)"),
    "configfs-root": (nvmet.DEFAULT_ROOT, "nvmet configfs root"),
    "device-timeout": ("60", "seconds to wait for a zvol device node"),
    "gc-interval": ("60", "seconds between sweeps of deleted volumes"),
    "usage-cycle": (str(int(MIN_CYCLE)), "at least this many seconds for one pass of the usage sweep over every "
                    "volume (the per-namespace sums: at most that old, and idle volumes cost no CPU between)"),
    "log-level": ("info", "log level"),
    "shutdown-grace": ("20", "seconds running calls get to finish after SIGTERM (below the pod's grace period)"),
    "commitment-ratio": (str(commitment.DEFAULT_RATIO), "new volumes and growths are refused once the sum of "
                         "volume sizes (plus what snapshots can pin) would pass this x the pool's size"),
    "growth-reserve": ("0.05", "fraction of the pool's space no new volume may take: kept for existing volumes "
                       "to grow into"),
    "key-wrapping-file": (None, "file with 64 hex characters (openssl rand -hex 32): the node key that wraps the "
                          "kept keys of published encrypted volumes; without it encrypted volumes are refused"),
    "move-listen": (None, "HOST:PORT of this node's move port, where a target agent fetches a moving volume's "
                    f"stream (default: the NVMe/TCP address, port {DEFAULT_MOVE_PORT}; 'off' disables moves)"),
    "failpoint": (None, "crash tests only: SIGKILL self or stall at OP:WHEN (see agent/failpoints.py)"),
}
_FLAGS = ("insecure", "tls-request", "rebuild-index", "dhchap", "dhchap-bidirectional", "no-guard",
          "usage-volume-metrics")


@dataclass(frozen=True)
class Settings:
    node: str
    pool: str
    parent: str
    listen: str
    nvme_address: str
    nvme_port: str
    metrics_listen: str
    state_dir: str
    tls: tuple[str, str, str] | None
    configfs_root: str
    device_timeout: float
    gc_interval: float
    log_level: str
    rebuild_index: bool
    failpoint: str = ""
    controller_cn: str = "zvolt-controller"
    shutdown_grace: float = 20.0
    dhchap: bool = False  # every publish must bring DH-HMAC-CHAP keys (agent/dhchap.py)
    dhchap_bidirectional: bool = False  # ... and a controller key: the host authenticates the target too
    # The operator's storage network (CIDR) or "": then nvme_address came from --nvme-listen and
    # nothing guards the port. With it, nvme_address is "" until resolve_nvme_address() picks
    # the node's own address inside it (a host lookup, so not done while parsing).
    storage_network: str = ""
    guard: bool = False  # install the storage-node nftables guard (zvolt/nftguard.py)
    guard_interval: float = guardkeeper.DEFAULT_INTERVAL
    commitment_ratio: float = commitment.DEFAULT_RATIO
    growth_reserve: float = 0.05
    # Per-volume usage series (zvolt_agent_volume_*_bytes): one series per volume, so off by default.
    usage_volume_metrics: bool = False
    usage_cycle: float = MIN_CYCLE
    key_wrapping_file: str = ""  # agent/keystore.py; "" = no encrypted volumes on this node
    move_listen: str = ""  # agent/moves.py; "" = NVMe/TCP address:DEFAULT_MOVE_PORT, "off" = no moves
    # --tls-request: the serving certificate comes from the Kubernetes API (agent/certrequest.py),
    # lifetime asked in seconds; 0 = --tls-cert/--tls-key files given by the operator.
    tls_request_seconds: int = 0
    nvme_tls_port: str = "4421"


def _env_name(flag: str) -> str:
    return "ZVOLT_" + flag.upper().replace("-", "_")


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def _seconds(ap: argparse.ArgumentParser, flag: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        ap.error(f"--{flag} must be a number of seconds, not {value!r}")
    if not 0 <= seconds <= 3600:
        ap.error(f"--{flag} must be between 0 and 3600 seconds")
    return seconds


def parse_settings(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    ap = argparse.ArgumentParser(prog="zvolt-agent", description="zvolt storage-node agent")
    ap.add_argument("--config", default=None, help="JSON file with any of the options below")
    for flag, (_, help_) in _OPTIONS.items():
        ap.add_argument("--" + flag, default=None, help=help_)
    for flag in _FLAGS:
        ap.add_argument("--" + flag, action="store_true", default=None)
    args = vars(ap.parse_args(argv))
    config: dict[str, Any] = {}
    config_path = args.get("config") or env.get("ZVOLT_CONFIG")
    if config_path:
        with open(config_path) as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            ap.error(f"{config_path}: expected a JSON object")
        config = {str(k).replace("_", "-"): v for k, v in loaded.items()}

    def get(flag: str) -> Any:
        value = args.get(flag.replace("-", "_"))
        if value is None:
            value = env.get(_env_name(flag))
        if value is None:
            value = config.get(flag)
        if value is None and flag in _OPTIONS:
            value = _OPTIONS[flag][0]
        return value

    missing = [f"--{f}" for f in ("node-name", "pool") if not get(f)]
    if not get("nvme-listen") and not get("storage-network"):
        missing.append("--storage-network CIDR (or --nvme-listen IP:PORT)")
    if missing:
        ap.error("missing required settings: " + ", ".join(missing))
    try:
        node = names.check_node(str(get("node-name")))
        pool = names.check_pool(str(get("pool")))
        parent = names.check_dataset(str(get("parent") or f"{pool}/zvolt"))
    except Exception as exc:
        ap.error(str(exc))
    if parent.split("/")[0] != pool:
        ap.error(f"--parent {parent} is not in pool {pool}")
    storage_network, nvme_addr, nvme_port = _nvme_listener(ap, get("storage-network"), get("nvme-listen"),
                                                           get("nvme-port"))
    try:
        tls_port = str(parse_port(get("nvme-tls-port") or str(int(nvme_port) + 1)))
    except GuardConfigError as exc:
        ap.error(f"--nvme-tls-port: {exc}")
    if tls_port == nvme_port:
        ap.error(f"--nvme-tls-port {tls_port} is the clear-text NVMe/TCP port too: give another port")
    guard_interval = _seconds(ap, "guard-interval", get("guard-interval"))
    if guard_interval < 1:
        ap.error("--guard-interval must be at least 1 second")
    tls_parts = [get("tls-cert"), get("tls-key"), get("tls-ca")]
    insecure = _truthy(get("insecure"))
    tls: tuple[str, str, str] | None = None
    tls_request_seconds = 0
    if _truthy(get("tls-request")):
        if tls_parts[0] or tls_parts[1] or not tls_parts[2]:
            ap.error("--tls-request asks the Kubernetes API for this node's certificate: give --tls-ca, "
                     "not --tls-cert/--tls-key")
        try:
            hours = float(str(get("tls-request-hours")))
        except ValueError:
            hours = 0.0
        if not 1 <= hours <= 8760:
            ap.error(f"--tls-request-hours must be 1 to 8760 hours, not {get('tls-request-hours')!r}")
        tls_request_seconds = int(hours * 3600)
        where = certrequest.paths(str(get("state-dir")))
        tls = (str(where.cert), str(where.key), str(tls_parts[2]))
    elif all(tls_parts):
        tls = (str(tls_parts[0]), str(tls_parts[1]), str(tls_parts[2]))
    elif any(tls_parts):
        ap.error("give all of --tls-cert, --tls-key and --tls-ca")
    elif not insecure:
        ap.error("refusing to serve without mTLS: give --tls-cert/--tls-key/--tls-ca, or --insecure")
    listen = str(get("listen"))
    try:
        parse_endpoint(listen)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        ratio = commitment.check_ratio(get("commitment-ratio"), "--commitment-ratio")
    except ZvoltError as exc:
        ap.error(exc.message)
    try:
        reserve = float(str(get("growth-reserve")))
    except ValueError:
        reserve = -1.0
    if not 0 <= reserve < 1:
        ap.error(f"--growth-reserve must be a fraction of the pool from 0 to below 1, not {get('growth-reserve')!r}")
    return Settings(
        node=node, pool=pool, parent=parent, listen=listen, nvme_address=nvme_addr.strip("[]"), nvme_port=nvme_port,
        metrics_listen=str(get("metrics-listen") or ""), state_dir=str(get("state-dir")), tls=tls,
        configfs_root=str(get("configfs-root")), device_timeout=float(get("device-timeout")),
        gc_interval=float(get("gc-interval")), log_level=str(get("log-level")),
        rebuild_index=_truthy(get("rebuild-index")), failpoint=str(get("failpoint") or ""),
        shutdown_grace=_seconds(ap, "shutdown-grace", get("shutdown-grace")),
        controller_cn=str(get("controller-cn")),
        dhchap=_truthy(get("dhchap")) or _truthy(get("dhchap-bidirectional")),
        dhchap_bidirectional=_truthy(get("dhchap-bidirectional")),
        storage_network=storage_network, guard=bool(storage_network) and not _truthy(get("no-guard")),
        commitment_ratio=ratio, growth_reserve=reserve,
        guard_interval=guard_interval, usage_volume_metrics=_truthy(get("usage-volume-metrics")),
        usage_cycle=_seconds(ap, "usage-cycle", get("usage-cycle")),
        key_wrapping_file=str(get("key-wrapping-file") or ""), move_listen=str(get("move-listen") or ""),
        tls_request_seconds=tls_request_seconds, nvme_tls_port=tls_port,
    )


def _nvme_listener(ap: argparse.ArgumentParser, network: Any, listen: Any, port: Any) -> tuple[str, str, str]:
    """(storage network, address or "" to pick later, port) from the three settings."""
    net = ""
    if network:
        try:
            net = str(parse_network(str(network)))
        except StorageNetworkError as exc:
            ap.error(f"--storage-network: {exc}")
    try:
        port_flag = parse_port(str(port)) if port else None
    except GuardConfigError as exc:
        ap.error(f"--nvme-port: {exc}")
    if not listen:
        return net, "", str(port_flag or 4420)
    addr, sep, listen_port = str(listen).rpartition(":")
    addr = addr.strip("[]")
    if not sep or not listen_port.isdigit():
        ap.error("--nvme-listen must be IP:PORT")
    if port_flag is not None and port_flag != int(listen_port):
        ap.error(f"--nvme-port {port_flag} and --nvme-listen {listen} name different ports")
    if net:
        try:
            inside = ipaddress.ip_address(addr) in ipaddress.ip_network(net)
        except ValueError:
            inside = False
        if not inside:
            ap.error(f"--nvme-listen {listen}: the address is not in --storage-network {net}")
    return net, addr, listen_port


def resolve_nvme_address(settings: Settings, lister: Callable[[int], list[Any]] = node_addresses) -> Settings:
    """With only --storage-network given, the target listens on this node's one address in it."""
    if settings.nvme_address:
        return settings
    network = parse_network(settings.storage_network)
    address = pick_address(network, lister(network.version))
    return dataclasses.replace(settings, nvme_address=str(address))


def move_port(settings: Settings) -> int | None:
    """The move port (agent/moves.py), None when moves are off. The guard keeps it to the storage
    network like the NVMe/TCP port: a move stream needs a one-time token, and nothing else on the
    node needs to reach it."""
    if settings.move_listen == "off":
        return None
    return parse_port(settings.move_listen.rpartition(":")[2]) if settings.move_listen else DEFAULT_MOVE_PORT


def start_guard(settings: Settings, metrics: Metrics) -> None:
    """Install the storage-node guard before any export is linked to the port, and keep it."""
    if not settings.guard:
        why = "--no-guard" if settings.storage_network else "no --storage-network"
        _log.warning("NVMe/TCP port %s is not guarded (%s): any host that routes to %s can connect",
                     settings.nvme_port, why, settings.nvme_address)
        return
    ports = guarded_ports([settings.nvme_port, settings.nvme_tls_port], move_port(settings))
    spec = guard_spec(Role.STORAGE, settings.storage_network, ports)
    guardkeeper.install(spec, registry=metrics.registry, prefix="zvolt_agent", interval=settings.guard_interval)


def open_index(state_dir: str, rebuild: bool = False) -> tuple[Index, bool]:
    """Open the index (migrating an older schema in place); a corrupt one, or one a newer agent
    wrote when --rebuild-index is given, is moved aside (kept for inspection) and rebuilt."""
    try:
        return Index(state_dir), False
    except IndexTooNew as exc:
        if not rebuild:
            raise SystemExit(f"zvolt-agent: {exc}") from None
        reason, tag = str(exc), "newer"
    except IndexCorrupt as exc:
        reason, tag = f"index is corrupt ({exc})", "corrupt"
    path = os.path.join(state_dir, "index.sqlite")
    aside = f"{path}.{tag}-{int(time.time())}"
    _log.error("%s; moving it to %s and rebuilding from ZFS", reason, aside)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    return Index(state_dir), True


@dataclass
class Agent:
    settings: Settings
    volumes: Volumes
    readiness: Readiness
    metrics: Metrics
    server: grpc.Server
    recovery: Recovery
    servicer: AgentServicer
    inflight: InFlight
    send_server: SendServer | None = None


def build(settings: Settings, zfs: Zfs, root: nvmet.Root, index: Index) -> Agent:
    cfg = AgentConfig(node=settings.node, pool=settings.pool, parent=settings.parent,
                      nvme_address=settings.nvme_address, nvme_port=settings.nvme_port,
                      commitment_ratio=settings.commitment_ratio, reserve_fraction=settings.growth_reserve)
    # Keys of authenticated volumes are taken whenever a publish brings them; --dhchap refuses one without.
    auth = HostKeys(settings.state_dir, AuthConfig(bidirectional=settings.dhchap_bidirectional))
    exports = Exports(zfs, root, ExportConfig(settings.node, settings.nvme_address, settings.nvme_port,
                                              settings.device_timeout, tls_port=settings.nvme_tls_port),
                      auth=auth, require_auth=settings.dhchap, keyring=KernelKeyring())
    try:
        store = KeyStore(settings.state_dir, read_wrapping_key(settings.key_wrapping_file)) \
            if settings.key_wrapping_file else None
    except KeyStoreError as exc:
        raise SystemExit(str(exc)) from exc
    volumes = Volumes(cfg, zfs, index, exports, VolumeLocks(), keys=Keys(zfs, store))
    readiness = Readiness()
    metrics = Metrics()
    usage = Usage(volumes, Zpool(), metrics, per_volume=settings.usage_volume_metrics,
                  min_cycle=settings.usage_cycle)
    moves, send_server = _moves(settings, zfs, volumes)
    servicer = AgentServicer(volumes, readiness, metrics, usage, moves)
    inflight = InFlight()
    server = make_server(servicer, metrics, inflight=inflight,
                         authz=Authorizer([settings.controller_cn]) if settings.tls else None)
    endpoint = parse_endpoint(settings.listen)
    prepare_unix_socket(endpoint)
    target = f"unix:{endpoint.path}" if endpoint.scheme == "unix" else endpoint.address
    if settings.tls:
        port = server.add_secure_port(target, server_credentials(Watched(TlsFiles(*settings.tls))))
    else:
        port = server.add_insecure_port(target)
    if endpoint.scheme == "tcp" and port == 0:
        raise SystemExit(f"cannot listen on {settings.listen}")
    recovery = Recovery(zfs, index, exports, volumes, readiness,
                        progress=lambda line: _log.info(line, extra={"fields": {"phase": "recovery"}}))
    return Agent(settings, volumes, readiness, metrics, server, recovery, servicer, inflight, send_server)


def _moves(settings: Settings, zfs: Zfs, volumes: Volumes) -> tuple[Moves | None, SendServer | None]:
    """The move port (agent/moves.py) on the storage network, TLS with the serving certificate when
    the agent has one; a target checks it against the CA and needs no client certificate."""
    if settings.move_listen == "off" or not isinstance(zfs, Streams):
        return None, None
    listen = settings.move_listen or f"{settings.nvme_address}:{DEFAULT_MOVE_PORT}"
    tls_server, tls_client = tls_contexts(*settings.tls) if settings.tls else (None, None)
    moves = Moves(volumes, zfs, listen, tls_server=tls_server, tls_client=tls_client)
    return moves, SendServer(moves, listen)


def node_certificate(settings: Settings, api: certrequest.CsrApi, stop: threading.Event | None = None,
                     retry: float = certrequest.RETRY_SECONDS) -> threading.Thread:
    """This node's serving certificate in <state-dir>/tls before the port opens (waiting for the
    signer as long as it takes: without it nobody can call), then kept renewed in the background."""
    assert settings.tls is not None
    stop = stop or threading.Event()
    keeper = certrequest.NodeCertificate(api, settings.node, settings.state_dir, settings.tls[2],
                                         settings.tls_request_seconds)
    while True:
        try:
            cert = keeper.ensure()
            break
        except Exception as exc:
            _log.error("no serving certificate yet; retrying", extra={"fields": {
                "node": settings.node, "error": str(exc), "retry_s": retry}})
            if stop.wait(retry):
                raise SystemExit("zvolt-agent: stopped before a serving certificate was issued") from None
    thread = threading.Thread(target=keeper.keep, args=(cert, stop), name="certificate", daemon=True)
    thread.start()
    return thread


def _print_progress(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    setup_logging(settings.log_level)
    index, corrupt = open_index(settings.state_dir, rebuild=settings.rebuild_index)
    zfs: Zfs = LibZfs()
    if settings.failpoint:
        zfs = FailpointZfs(zfs, settings.failpoint)  # type: ignore[assignment]
    root = nvmet.Root(settings.configfs_root)
    if settings.rebuild_index and not corrupt:
        # Explicit slow path, run in the foreground with progress lines, then exit.
        from agent.records import Layout
        from agent.recovery import ensure_layout, rebuild_index

        layout = Layout(settings.parent)
        ensure_layout(zfs, layout)
        rebuild_index(zfs, index, layout, _print_progress)
        return 0
    try:
        settings = resolve_nvme_address(settings)
    except StorageNetworkError as exc:
        raise SystemExit(f"zvolt-agent: --storage-network: {exc}") from None
    if settings.tls_request_seconds:
        node_certificate(settings, certrequest.KubernetesCsrApi())
    agent = build(settings, zfs, root, index)
    try:
        start_guard(settings, agent.metrics)
    except GuardError as exc:
        raise SystemExit(f"zvolt-agent: {exc}; pods could reach the NVMe/TCP port. Fix nft on this node, "
                         "or pass --no-guard (unsafe)") from None
    _log.info("NVMe/TCP target address", extra={"fields": {
        "nvme_listen": f"{settings.nvme_address}:{settings.nvme_port}", "storage_network": settings.storage_network}})
    if settings.metrics_listen:
        host, _, port = settings.metrics_listen.rpartition(":")
        try:
            agent.metrics.serve(host or "0.0.0.0", int(port))  # noqa: S104 - pod network, metrics only
        except OSError as exc:
            # Metrics are not worth refusing service for; say so loudly instead.
            _log.error("cannot serve metrics on %s: %s", settings.metrics_listen, exc)
    agent.server.start()
    if agent.send_server is not None:
        try:
            agent.send_server.start()
        except (OSError, ZvoltError) as exc:
            raise SystemExit(f"zvolt-agent: cannot listen for moves on {agent.send_server.listen}: {exc}") from None
    _log.info("agent serving", extra={"fields": {"listen": settings.listen, "node": settings.node}})
    stop = threading.Event()

    threading.Thread(target=recover, args=(agent, corrupt, stop), name="recovery", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    tick = min(settings.gc_interval, 15.0)
    last_gc = time.monotonic()
    while not stop.wait(tick):
        if not agent.readiness.ready:
            continue
        if agent.volumes.unrestored:
            try:
                agent.recovery.retry_unrestored()
            except Exception:
                _log.exception("retrying unrestored exports failed")
        agent.metrics.unrestored.set(len(agent.volumes.unrestored))
        try:
            agent.servicer.refresh_metrics()
        except Exception:
            _log.exception("metrics refresh failed")
        try:
            agent.servicer.usage.tick()
        except Exception:
            _log.exception("usage sweep failed")
        if time.monotonic() - last_gc >= settings.gc_interval:
            last_gc = time.monotonic()
            try:
                agent.volumes.gc.sweep()
            except Exception:
                _log.exception("periodic garbage collection failed")
    return _shut_down(agent, index)


def recover(agent: Agent, rebuild: bool, stop: threading.Event) -> None:
    """Start-up recovery (the recovery thread): sets `stop` only when the agent's state cannot be settled."""
    try:
        agent.recovery.run(rebuild=rebuild)
    except Exception:
        # recovery.run logged why; an agent that cannot settle its state must not serve.
        stop.set()
        return
    agent.metrics.startup.set(agent.readiness.startup_seconds)
    agent.metrics.ready.set(1)
    try:
        agent.servicer.refresh_metrics()
    except Exception:
        # A ready agent that stopped here would take its socket with it, for a gauge: the
        # periodic loop refreshes them again.
        _log.exception("metrics refresh after start-up failed")


def _shut_down(agent: Agent, index: Index, hard_exit: Callable[[int], object] = os._exit) -> int:
    was_ready = agent.readiness.ready
    grace = agent.settings.shutdown_grace
    running = agent.inflight.running()
    _log.info("shutting down: refusing new calls", extra={"fields": {"grace_s": grace, "in_flight": running}})
    agent.readiness.set(False, "shutting down")
    agent.metrics.ready.set(0)
    left = drain(agent.server, agent.inflight, grace)
    if left:
        # Their handler threads cannot be stopped, and the interpreter would wait for them at
        # exit past the pod's grace period. Exit now: each left an intent in the index, which
        # the next start-up settles against ZFS, so the caller's retry converges.
        _log.error("stopped with calls still running; the next start-up settles them",
                   extra={"fields": {"grace_s": grace, "still_running": left}})
        logging.shutdown()
        hard_exit(1)
        return 1
    index.close()
    _log.info("stopped: every running call finished", extra={"fields": {"finished": running}})
    return 0 if was_ready else 1


if __name__ == "__main__":
    sys.exit(main())
