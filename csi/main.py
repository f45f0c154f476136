"""zvolt-csi: one program, Identity always plus Controller or Node by --mode."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from csi import DEFAULT_ZONE, DRIVER_NAME, agentsigner, dhchap, drain, keyrotation, livepath, pathrelay, volmove
from csi.agents import AgentEndpoint, AgentPool, KubernetesDiscovery, TlsFiles, kubernetes_pod_lister, parse_static
from csi.attachments import Reconciler, kubernetes_attachments, list_publishes, node_of, wanted
from csi.controller import RPC, ControllerService, alpha_capabilities
from csi.group_controller import GroupControllerService
from csi.health import StorageHealth
from csi.host_identity import load_or_create
from csi.identity import IdentityService
from csi.metrics import Metrics
from csi.mounter import SystemMounter
from csi.node import NodeService
from csi.nvme_host import SysfsNvmeHost
from csi.placements import KubernetesRecords, PlacementRecords
from csi.server import Services, build_server, serve
from csi.trim import Trimmer, TrimMetrics, TrimSchedule
from csi.usage import collect, render
from zvolt import guardkeeper, kubeconfig
from zvolt.errors import ZvoltError
from zvolt.guardkeeper import GuardError
from zvolt.keyring import KernelKeyring
from zvolt.logs import setup_logging
from zvolt.names import check_node
from zvolt.nftguard import GuardConfigError, Role, guard_spec, guarded_ports
from zvolt.rpc import parse_endpoint

_log = logging.getLogger("zvolt.csi")


def _env(flag: str, default: str | None = None) -> str | None:
    return os.environ.get("ZVOLT_" + flag.upper().replace("-", "_"), default)


def _env_flag(flag: str) -> bool:
    return (_env(flag) or "").lower() in ("1", "true", "yes", "on")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zvolt-csi", description="zvolt CSI driver (csi.zvolt.io)")
    p.add_argument("--mode", choices=["controller", "node", "attachments", "usage", "rotate-key", "move", "live-path",
                                      "drain", "rebalance", "uncordon"],
                   default=_env("mode"), required=_env("mode") is None,
                   help="attachments: list what storage nodes publish and whether Kubernetes still attaches it "
                   "(run in the controller container: same settings); --clear unpublishes the stale ones. "
                   "usage: space per volume and pool on every storage node (same settings). "
                   "rotate-key: zfs change-key of encrypted volumes; one JSON line on stdin names them and "
                   "holds the old and new keys (kubectl zvolt rotate-key runs it). "
                   "move: move --volume-id with its snapshots to storage node --to (kubectl zvolt move runs it; "
                   "with --live-relay a published one moves live, its hosts' steps relayed over stdin/stdout); "
                   "live-path: one host step of a live move in a node plugin container, a JSON request on stdin. "
                   "drain: cordon storage node --from and move every volume off it; "
                   "rebalance: even committed space across storage nodes; uncordon: --storage-node takes new "
                   "volumes again (kubectl zvolt drain-storage, rebalance, uncordon-storage run them)")
    p.add_argument("--endpoint", default=_env("endpoint", "unix:///csi/csi.sock"))
    p.add_argument("--metrics-listen", default=_env("metrics-listen"), help="HOST:PORT for Prometheus (9102/9103)")
    p.add_argument("--log-level", default=_env("log-level", "info"))
    p.add_argument("--zone", default=_env("zone", DEFAULT_ZONE), help="topology zone of this node / of static agents")
    # controller
    p.add_argument("--agents", default=_env("agents"), help="name=addr,name=addr")
    p.add_argument("--agents-from-kubernetes", action="store_true", default=_env_flag("agents-from-kubernetes"))
    p.add_argument("--agent-namespace", default=_env("agent-namespace", "zvolt"))
    p.add_argument("--agent-selector", default=_env("agent-selector", "app.kubernetes.io/component=agent"))
    p.add_argument("--agent-port", type=int, default=int(_env("agent-port", "7001") or 7001))
    p.add_argument(
        "--agent-zone-from-node-label", action="store_true",
        help="zone of a discovered agent = its node's topology.kubernetes.io/zone (node plugins must then "
        "be given the same zones with --zone); default: every agent is in --zone",
    )
    p.add_argument("--tls-cert", default=_env("tls-cert"))
    p.add_argument("--tls-key", default=_env("tls-key"))
    p.add_argument("--tls-ca", default=_env("tls-ca"))
    p.add_argument("--tls-server-name", default=_env("tls-server-name", ""),
                   help="one name every agent's certificate must carry (shared agent certificate)")
    p.add_argument("--tls-per-node-names", action="store_true", default=_env_flag("tls-per-node-names"),
                   help="each agent's certificate must carry its own storage-node name (per-node certificates)")
    p.add_argument("--sign-agent-certificates", action="store_true", default=_env_flag("sign-agent-certificates"),
                   help="approve and sign agents' CertificateSigningRequests (signer zvolt.io/agent-serving): "
                   "each agent only for the node its pod runs on (csi/agentsigner.py)")
    p.add_argument("--agent-signer-ca-cert", default=_env("agent-signer-ca-cert"), help="CA certificate that signs")
    p.add_argument("--agent-signer-ca-key", default=_env("agent-signer-ca-key"), help="its key (PEM)")
    p.add_argument("--agent-service-account", default=_env("agent-service-account"),
                   help="the agents' ServiceAccount in --agent-namespace: the only requester that is signed for")
    p.add_argument("--agent-cert-hours", type=float, default=float(_env("agent-cert-hours", "168") or 168),
                   help="longest lifetime of a signed agent certificate")
    p.add_argument("--insecure", action="store_true", default=_env_flag("insecure"))
    p.add_argument(
        "--alpha-capabilities", default=_env("alpha-capabilities", ""),
        help="comma list of alpha CSI capabilities to advertise (GET_SNAPSHOT); off by default since "
        "sidecars built for an older CSI spec may not know them",
    )
    p.add_argument(
        "--dhchap-secret-namespace", default=_env("dhchap-secret-namespace", ""), metavar="NAMESPACE",
        help="keep each DH-HMAC-CHAP volume's keys in a Secret zvolt-dhchap-<PV name> here (StorageClass "
        "parameter dhchap; the chart sets this to its namespace); empty: classes may not ask for dhchap",
    )
    p.add_argument(
        "--dhchap-secret-dir", default=_env("dhchap-secret-dir", ""), metavar="DIR",
        help="without Kubernetes: keep each DH-HMAC-CHAP volume's keys in DIR/zvolt-dhchap-<name> (0600 JSON), "
        "to be handed to the node plugin as node-stage secrets",
    )
    p.add_argument(
        "--reconcile-attachments", type=float, default=float(_env("reconcile-attachments", "0") or 0),
        metavar="SECONDS", help="every SECONDS, unpublish what no VolumeAttachment wants any more (two passes in a "
        "row, only where this pod's csi-attacher leads; needs --agents-from-kubernetes); 0: off",
    )
    p.add_argument("--clear", action="store_true", help="attachments mode: unpublish the stale ones")
    p.add_argument("--volume-id", help="move mode: the CSI volume id (a PV's volumeHandle)")
    p.add_argument("--to", metavar="NODE", help="move mode: the storage node to move it to")
    p.add_argument("--live-relay", action="store_true",
                   help="move mode: a published volume moves live; the first stdin line holds its volume context, "
                   "then each host step is a 'zvolt-live-path {...}' line out and one answer line in")
    p.add_argument("--from", dest="from_node", metavar="NODE", help="drain mode: the storage node to empty")
    p.add_argument("--storage-node", metavar="NODE", help="uncordon mode: the storage node")
    p.add_argument("--parallel", type=int, default=2, help="drain and rebalance: moves at once (default 2)")
    p.add_argument("--dry-run", action="store_true", help="drain and rebalance: print the plan, change nothing")
    p.add_argument("--rate-limit", type=float, default=0.0, metavar="MIB_PER_S",
                   help="drain and rebalance: MiB/s each move's stream may take (default 0: no limit)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table",
                   help="attachments and usage mode output")
    # node
    p.add_argument("--node-id", default=_env("node-id"))
    p.add_argument("--state-dir", default=_env("state-dir", "/var/lib/zvolt-node"))
    p.add_argument("--max-volumes", type=int, default=int(_env("max-volumes", "0") or 0))
    p.add_argument("--ctrl-loss-tmo", type=int, default=int(_env("ctrl-loss-tmo", "600") or 600))
    p.add_argument("--reconnect-delay", type=int, default=int(_env("reconnect-delay", "10") or 10))
    p.add_argument("--sysfs-root", default=_env("sysfs-root", "/sys"))
    p.add_argument(
        "--storage-network", default=_env("storage-network"), metavar="CIDR",
        help="node: the storage network; an nftables guard drops pod traffic (forwarded) to its NVMe/TCP ports",
    )
    p.add_argument("--nvme-port", default=_env("nvme-port", "4420,4421"), metavar="PORT[,PORT]",
                   help="node: NVMe/TCP ports of the storage nodes, clear-text and TLS, for the guard "
                        "(default 4420,4421)")
    p.add_argument("--no-guard", action="store_true", default=_env_flag("no-guard"),
                   help="node: UNSAFE, install no guard: pods can then reach NVMe/TCP targets (SECURITY.md)")
    p.add_argument("--guard-interval", type=float, default=float(_env("guard-interval", "30") or 30),
                   metavar="SECONDS", help="node: seconds between checks that the guard is intact (re-applied if not)")
    p.add_argument(
        "--trim-interval", type=float, default=float(_env("trim-interval", "3600") or 0), metavar="SECONDS",
        help="node: fstrim each staged zvolt filesystem about every SECONDS (one at a time, spread with "
        "jitter) so deleted blocks go back to the pool; 0: off (then use the `discard` mount option)",
    )
    return p


def _pool(args: argparse.Namespace) -> AgentPool:
    tls = None
    if not args.insecure:
        if not (args.tls_cert and args.tls_key and args.tls_ca):
            raise SystemExit("controller needs --tls-cert, --tls-key and --tls-ca (or --insecure)")
        if args.tls_per_node_names and args.tls_server_name:
            raise SystemExit("give --tls-server-name (one name for all agents) or --tls-per-node-names, not both")
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name)
    discover: Callable[[], Iterable[AgentEndpoint]]
    if args.agents_from_kubernetes:
        discover = KubernetesDiscovery(
            kubernetes_pod_lister(args.zone, args.agent_zone_from_node_label),
            args.agent_namespace, args.agent_selector, args.agent_port,
        )
    elif args.agents:
        static = parse_static(args.agents, args.zone)
        discover = lambda: static  # noqa: E731
    else:
        raise SystemExit("controller needs --agents name=addr,... or --agents-from-kubernetes")
    return AgentPool(discover, tls, per_node_names=tls is not None and args.tls_per_node_names)


def agent_signer(args: argparse.Namespace, api: agentsigner.CsrApi | None = None) -> agentsigner.Signer:
    """The signer of per-node agent certificates; the CA is read again for each signature, so a
    rotated CA Secret takes effect without a restart."""
    if not (args.agent_signer_ca_cert and args.agent_signer_ca_key and args.agent_service_account):
        raise SystemExit("--sign-agent-certificates needs --agent-signer-ca-cert, --agent-signer-ca-key and "
                         "--agent-service-account")
    if not 600 <= args.agent_cert_hours * 3600 <= 8760 * 3600:
        raise SystemExit("--agent-cert-hours must be from 1/6 (10 minutes) to 8760")
    cert, key = args.agent_signer_ca_cert, args.agent_signer_ca_key

    def ca() -> agentsigner.CA:
        with open(cert, "rb") as c, open(key, "rb") as k:
            return agentsigner.CA.load(c.read(), k.read())

    ca()  # a missing or mismatched CA stops the start, not the first signature
    policy = agentsigner.Policy(args.agent_namespace, args.agent_service_account, int(args.agent_cert_hours * 3600))
    return agentsigner.Signer(api if api is not None else agentsigner.KubernetesCsrApi(), ca, policy)


def _controller(args: argparse.Namespace) -> Services:
    # With the Kubernetes API at hand, each create is recorded on its PVC first, so a storage
    # node that is down holds up only the creates that were sent to it (csi/placements.py).
    records = KubernetesRecords() if args.agents_from_kubernetes else None
    services = controller_services(_pool(args), alpha_capabilities(args.alpha_capabilities), records,
                                   _volume_keys(args))
    assert services.controller is not None
    services.controller.warm()
    if args.sign_agent_certificates:
        signer = agent_signer(args)
        threading.Thread(target=signer.run, args=(threading.Event(),), name="agent-signer", daemon=True).start()
    if args.reconcile_attachments > 0:
        reconciler = _reconciler(args, services)
        threading.Thread(target=reconciler.run, args=(threading.Event(), args.reconcile_attachments),
                         name="attachments", daemon=True).start()
    return services


def _reconciler(args: argparse.Namespace, services: Services) -> Reconciler:
    if not args.agents_from_kubernetes:
        raise SystemExit("attachments need the Kubernetes API: give --agents-from-kubernetes")
    controller = services.controller
    assert controller is not None
    lister, is_leader = kubernetes_attachments(DRIVER_NAME, args.agent_namespace, socket.gethostname())
    return Reconciler(controller.pool, lister,
                      lambda pub, still: controller.unpublish_if(pub.volume_id, pub.host, still), is_leader)


def attachments(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """`zvolt-csi --mode attachments [--clear]`: the operator's view (docs: csi/README.md)."""
    services = controller_services(_pool(args))
    reconciler = _reconciler(args, services)

    publishes, failed = list_publishes(reconciler.pool)
    kube = reconciler.kube()
    rows = []
    for pub in publishes:
        stale = not wanted(pub, kube)
        cleared = False
        if stale and args.clear:
            cleared = reconciler.unpublish(pub, lambda pub=pub: not wanted(pub, reconciler.kube()))  # type: ignore[misc]
        rows.append({"volume_id": pub.volume_id, "host_nqn": pub.host, "node": node_of(pub.host, kube) or "",
                     "state": "cleared" if cleared else "stale" if stale else "attached"})
    if args.output == "json":
        out(json.dumps({"attachments": rows, "unreachable": failed}, indent=2))
    else:
        out(f"{'VOLUME':<40} {'NODE':<24} {'STATE':<8} HOST NQN")
        for r in rows:
            out(f"{r['volume_id']:<40} {r['node'] or '?':<24} {r['state']:<8} {r['host_nqn']}")
        for name, why in failed.items():
            out(f"storage node {name} did not answer: {why}")
    return 1 if failed else 0


def usage(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """`zvolt-csi --mode usage`: what `kubectl zvolt usage` shows (docs: csi/README.md)."""
    rows, pools, failed = collect(_pool(args))
    out(render(rows, pools, failed, args.output))
    return 1 if failed else 0


def rotate_key(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """`zvolt-csi --mode rotate-key` (docs: csi/README.md, "Encryption"): keys on stdin, never argv."""
    request = keyrotation.read_request(sys.stdin)
    outcome = keyrotation.rotate(_pool(args), request)
    out(outcome.as_json())
    return 1 if outcome.failed else 0


def _say(line: str) -> None:
    print(line, flush=True)  # a drain runs for long: each line as it comes, also through a pipe


def move(args: argparse.Namespace, out: Callable[[str], None] = _say) -> int:
    """`zvolt-csi --mode move --volume-id ID --to NODE` (csi/volmove.py; kubectl zvolt move runs it)."""
    if not args.volume_id or not args.to:
        raise SystemExit("move mode needs --volume-id and --to")
    live: volmove.LiveSwitch | None = None
    if args.live_relay:
        context, keys = pathrelay.read_context(sys.stdin), _volume_keys(args)
        ask = pathrelay.stdio_ask(sys.stdout, sys.stdin)

        def live(volume_id: str, vol: Any) -> pathrelay.RelayedPaths:
            return pathrelay.RelayedPaths(volume_id, vol.name, list(vol.published_hosts), context, keys, ask)

    volmove.move(_pool(args), args.volume_id, args.to, say=out, live=live)
    return 0


def live_path(args: argparse.Namespace) -> int:
    """`zvolt-csi --mode live-path` in a node plugin container (csi/livepath.py): one request on stdin."""
    services = _node(args)
    assert services.node is not None
    return livepath.serve_one(services.node, sys.stdin, sys.stdout)


def drain_mode(args: argparse.Namespace, out: Callable[[str], None] = _say) -> int:
    """`zvolt-csi --mode drain --from NODE` (csi/drain.py; kubectl zvolt drain-storage runs it)."""
    if not args.from_node:
        raise SystemExit("drain mode needs --from NODE")
    return drain.drain(_pool(args), args.from_node, _parallel(args), args.dry_run, out, _rate(args))


def rebalance_mode(args: argparse.Namespace, out: Callable[[str], None] = _say) -> int:
    """`zvolt-csi --mode rebalance` (csi/rebalance.py plans, csi/drain.py moves)."""
    return drain.rebalance_run(_pool(args), _parallel(args), args.dry_run, out, _rate(args))


def uncordon_mode(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    if not args.storage_node:
        raise SystemExit("uncordon mode needs --storage-node NODE")
    return drain.uncordon(_pool(args), args.storage_node, out)


def _parallel(args: argparse.Namespace) -> int:
    _check_drain_options(args)
    return int(args.parallel)


def _rate(args: argparse.Namespace) -> int:
    _check_drain_options(args)
    return int(args.rate_limit * (1 << 20))


def _check_drain_options(args: argparse.Namespace) -> None:
    try:
        drain.check_options(args.parallel, args.rate_limit)
    except ZvoltError as err:
        raise SystemExit(err.message) from None


def _volume_keys(args: argparse.Namespace) -> dhchap.VolumeKeys | None:
    """DH-HMAC-CHAP keys in Secrets of this namespace (csi/dhchap.py); None: classes may not ask for it."""
    if args.dhchap_secret_namespace and args.dhchap_secret_dir:
        raise SystemExit("give --dhchap-secret-namespace or --dhchap-secret-dir, not both")
    if args.dhchap_secret_dir:
        return dhchap.VolumeKeys(dhchap.FileSecrets(args.dhchap_secret_dir))
    if not args.dhchap_secret_namespace:
        return None
    from kubernetes import client

    kubeconfig.load()
    return dhchap.VolumeKeys(dhchap.KubeSecrets(client.CoreV1Api(), args.dhchap_secret_namespace))


def controller_services(pool: AgentPool, alpha: tuple[RPC.Type, ...] = (),
                        records: PlacementRecords | None = None, keys: dhchap.VolumeKeys | None = None) -> Services:
    """Liveness is this process answering: storage readiness is a metric (csi/health.py), so
    livenessprobe never restarts the controller for a storage outage."""
    controller = ControllerService(pool, alpha=alpha, records=records, keys=keys)
    return Services(
        identity=IdentityService(controller=True, ready=lambda: True),
        controller=controller,
        health=StorageHealth(pool),
        group_controller=GroupControllerService(pool, controller.locks, controller.locator),
    )


def _node(args: argparse.Namespace) -> Services:
    if not args.node_id:
        raise SystemExit("node mode needs --node-id")
    check_node(args.node_id)
    identity = load_or_create(args.state_dir, args.node_id)
    node = NodeService(
        identity,
        SysfsNvmeHost(args.sysfs_root, keyring=KernelKeyring()),
        SystemMounter(),
        zone=args.zone,
        max_volumes=args.max_volumes,
        ctrl_loss_tmo=args.ctrl_loss_tmo,
        reconnect_delay=args.reconnect_delay,
    )
    return Services(identity=IdentityService(controller=False, ready=lambda: True), node=node)


def node_guard(args: argparse.Namespace, metrics: Metrics) -> None:
    """The worker's guard, installed before the node plugin serves; refusing to start without
    one unless the operator said --no-guard (a pod could otherwise read a worker's volumes)."""
    if args.no_guard:
        _log.warning("NVMe/TCP guard disabled (--no-guard): pods on this node can reach storage targets")
        return
    if not args.storage_network:
        raise SystemExit("zvolt-csi: node mode needs --storage-network CIDR for its NVMe/TCP guard "
                         "(or --no-guard, unsafe: pods could then reach NVMe/TCP targets)")
    try:
        spec = guard_spec(Role.WORKER, args.storage_network, guarded_ports(args.nvme_port))
        guardkeeper.install(spec, registry=metrics.registry, prefix="zvolt_csi_node", interval=args.guard_interval)
    except (GuardConfigError, GuardError) as exc:
        raise SystemExit(f"zvolt-csi: NVMe/TCP guard: {exc} (--no-guard disables it, unsafe)") from None


def start_trimmer(args: argparse.Namespace, node: NodeService, metrics: Metrics) -> None:
    """The periodic trim (csi/trim.py) in a daemon thread, sharing the node's per-volume locks."""
    if args.trim_interval <= 0:
        _log.info("periodic trim off (--trim-interval 0)")
        return
    trimmer = Trimmer(TrimSchedule(args.trim_interval), SystemMounter(), SysfsNvmeHost(args.sysfs_root).subsystem_of,
                      node.locks, TrimMetrics(metrics.registry))  # fmt: skip
    threading.Thread(target=trimmer.run, args=(threading.Event(),), name="trim", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.log_level)
    one_shot = {"attachments": attachments, "usage": usage, "rotate-key": rotate_key, "move": move,
                "live-path": live_path, "drain": drain_mode, "rebalance": rebalance_mode, "uncordon": uncordon_mode}
    if args.mode in one_shot:
        try:
            return one_shot[args.mode](args)
        except ZvoltError as err:
            print(f"zvolt-csi: {err.message}", file=sys.stderr)
            return 2
    try:
        endpoint = parse_endpoint(args.endpoint)
        services = _controller(args) if args.mode == "controller" else _node(args)
        metrics = Metrics(args.mode)
        if args.mode == "node":
            node_guard(args, metrics)
            start_trimmer(args, services.node, metrics)
        if services.health is not None:
            metrics.registry.register(services.health)
            services.health.start()
        if args.metrics_listen:
            metrics.serve(args.metrics_listen)
        server, _ = build_server(services, endpoint, on_done=metrics.observe)
    except (ZvoltError, ValueError, OSError) as err:
        _log.error("cannot start", extra={"fields": {"error": str(err)}})
        return 2
    serve(server, endpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
