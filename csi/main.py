"""zvolt-csi: one program, Identity always plus Controller or Node by --mode."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence

from csi import DEFAULT_ZONE
from csi.agents import AgentEndpoint, AgentPool, KubernetesDiscovery, TlsFiles, kubernetes_pod_lister, parse_static
from csi.controller import RPC, ControllerService, alpha_capabilities
from csi.health import StorageHealth
from csi.host_identity import load_or_create
from csi.identity import IdentityService
from csi.metrics import Metrics
from csi.mounter import SystemMounter
from csi.node import NodeService
from csi.nvme_host import SysfsNvmeHost
from csi.server import Services, build_server, serve
from zvolt.errors import ZvoltError
from zvolt.logs import setup_logging
from zvolt.names import check_node
from zvolt.rpc import parse_endpoint

_log = logging.getLogger("zvolt.csi")


def _env(flag: str, default: str | None = None) -> str | None:
    return os.environ.get("ZVOLT_" + flag.upper().replace("-", "_"), default)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zvolt-csi", description="zvolt CSI driver (csi.zvolt.io)")
    p.add_argument("--mode", choices=["controller", "node"], default=_env("mode"), required=_env("mode") is None)
    p.add_argument("--endpoint", default=_env("endpoint", "unix:///csi/csi.sock"))
    p.add_argument("--metrics-listen", default=_env("metrics-listen"), help="HOST:PORT for Prometheus (9102/9103)")
    p.add_argument("--log-level", default=_env("log-level", "info"))
    p.add_argument("--zone", default=_env("zone", DEFAULT_ZONE), help="topology zone of this node / of static agents")
    # controller
    p.add_argument("--agents", default=_env("agents"), help="name=addr,name=addr")
    p.add_argument("--agents-from-kubernetes", action="store_true")
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
    p.add_argument("--tls-server-name", default=_env("tls-server-name", ""))
    p.add_argument("--insecure", action="store_true")
    p.add_argument(
        "--alpha-capabilities", default=_env("alpha-capabilities", ""),
        help="comma list of alpha CSI capabilities to advertise (GET_SNAPSHOT); off by default since "
        "sidecars built for an older CSI spec may not know them",
    )
    # node
    p.add_argument("--node-id", default=_env("node-id"))
    p.add_argument("--state-dir", default=_env("state-dir", "/var/lib/zvolt-node"))
    p.add_argument("--max-volumes", type=int, default=int(_env("max-volumes", "0") or 0))
    p.add_argument("--ctrl-loss-tmo", type=int, default=int(_env("ctrl-loss-tmo", "600") or 600))
    p.add_argument("--reconnect-delay", type=int, default=int(_env("reconnect-delay", "10") or 10))
    p.add_argument("--sysfs-root", default=_env("sysfs-root", "/sys"))
    return p


def _controller(args: argparse.Namespace) -> Services:
    tls = None
    if not args.insecure:
        if not (args.tls_cert and args.tls_key and args.tls_ca):
            raise SystemExit("controller needs --tls-cert, --tls-key and --tls-ca (or --insecure)")
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
    return controller_services(AgentPool(discover, tls), alpha_capabilities(args.alpha_capabilities))


def controller_services(pool: AgentPool, alpha: tuple[RPC.Type, ...] = ()) -> Services:
    """Liveness is this process answering: storage readiness is a metric (csi/health.py), so
    livenessprobe never restarts the controller for a storage outage."""
    return Services(
        identity=IdentityService(controller=True, ready=lambda: True),
        controller=ControllerService(pool, alpha=alpha),
        health=StorageHealth(pool),
    )


def _node(args: argparse.Namespace) -> Services:
    if not args.node_id:
        raise SystemExit("node mode needs --node-id")
    check_node(args.node_id)
    identity = load_or_create(args.state_dir, args.node_id)
    node = NodeService(
        identity,
        SysfsNvmeHost(args.sysfs_root),
        SystemMounter(),
        zone=args.zone,
        max_volumes=args.max_volumes,
        ctrl_loss_tmo=args.ctrl_loss_tmo,
        reconnect_delay=args.reconnect_delay,
    )
    return Services(identity=IdentityService(controller=False, ready=lambda: True), node=node)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        endpoint = parse_endpoint(args.endpoint)
        services = _controller(args) if args.mode == "controller" else _node(args)
        metrics = Metrics(args.mode)
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
