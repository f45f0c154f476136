"""`kubectl zvolt drain-storage NODE`, `uncordon-storage NODE`, `rebalance`.

Like `move`, these run `zvolt-csi --mode drain|uncordon|rebalance` (csi/drain.py) in a running
controller container with that container's settings (only the controller reaches the agents).
The drain cordons the node first and prints its plan before anything moves; a rerun after an
interruption carries on (what moved is not moved again). Exit code 1: something is left.
"""

from __future__ import annotations

from dataclasses import dataclass

from csi.drain import check_options
from kubectl_zvolt.attachments import CONTAINER, controller, one_shot
from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.kube import Exec, Kube
from zvolt.errors import ZvoltError
from zvolt.names import check_node


@dataclass(frozen=True)
class Run:
    code: int
    output: str


def _node(node: str) -> str:
    try:
        return check_node(node)
    except ZvoltError as err:
        raise PluginError(err.message) from None


def _options(parallel: int, dry_run: bool, rate_limit: float) -> list[str]:
    try:
        check_options(parallel, rate_limit)
    except ZvoltError as err:
        raise PluginError(err.message) from None
    return [f"--parallel={parallel}", f"--rate-limit={rate_limit:g}", *(["--dry-run"] if dry_run else [])]


def _run(kube: Kube, execute: Exec, mode: str, *extra: str) -> Run:
    pod, args = controller(kube.list_pods())
    code, out = execute(kube.namespace, pod, CONTAINER, one_shot(args, mode, *extra, "--log-level=error"))
    return Run(code, out)


def drain_storage(kube: Kube, execute: Exec, node: str, parallel: int = 2, dry_run: bool = False,
                  rate_limit: float = 0.0) -> Run:
    return _run(kube, execute, "drain", f"--from={_node(node)}", *_options(parallel, dry_run, rate_limit))


def uncordon_storage(kube: Kube, execute: Exec, node: str) -> Run:
    return _run(kube, execute, "uncordon", f"--storage-node={_node(node)}")


def rebalance(kube: Kube, execute: Exec, parallel: int = 2, dry_run: bool = False, rate_limit: float = 0.0) -> Run:
    return _run(kube, execute, "rebalance", *_options(parallel, dry_run, rate_limit))
