"""cluster suite, processes: many agents on fakes and a controller, each a real gRPC server.

`python -m bench.clusteragents agents SPEC` serves one or more agent identities in one process:
for each, the real agent servicer (`agent.server`) over `agent.fakes.make_node` (FakeZfs, emulated
configfs, the real Index/Volumes/Exports/Recovery), on its own unix socket. Each identity's
index is a copy of one template filled in bulk (`bench.simulate.populate`: N volumes, one snapshot
each, the first `simulate.PUBLISHED` published), so 100 nodes x 10,000 volumes cost one fill.
FakeZfs holds only the parents and the published zvols (as in `scale --simulate`): a request that
touched a filler dataset would fail, not pass.

`python -m bench.clusteragents controller SPEC` is the controller: `zvolt-csi --mode controller`'s
own wiring (`csi.main.parser`, `_pool`, `controller_services`, `csi.server`) with static agents;
with `records` it also gets in-memory placement records, standing in for the PVC annotations a
controller with Kubernetes discovery writes (csi/placements.py), without the API round trip.

Each process prints one JSON line once it serves, then runs until SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POOL_BYTES = 1 << 52  # 4 PiB of fake pool: 10,000 thin 1 GiB volumes stay far below any commitment limit


@dataclass
class AgentSpec:
    name: str
    state: str
    socket: str
    configfs: str


# --- measuring processes ----------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def hwm_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (the interpreter's libraries) counted once across processes,
    so a sum over many processes is what they really take."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return rss_kib(pid)


# --- the children -----------------------------------------------------------------------------


def _serve_agents(specs: Sequence[AgentSpec]) -> None:
    from agent.fakes import FakeZfs, make_node
    from agent.metrics import Metrics
    from agent.server import AgentServicer, make_server
    from bench import simulate

    servers = []
    for spec in specs:
        zfs = FakeZfs(pool_size=POOL_BYTES)
        for ds in (simulate.POOL, simulate.PARENT, f"{simulate.PARENT}/v", f"{simulate.PARENT}/trash"):
            zfs.create_filesystem(ds)
        for i in range(simulate.PUBLISHED):
            zfs.create_volume(f"{simulate.PARENT}/v/{simulate._vid(i)}", 1 << 30, {"volmode": "dev"})
        zfs.settle()
        node = make_node(spec.state, spec.configfs, zfs=zfs, node=spec.name, recover=True, pool_size=POOL_BYTES)
        if not node.readiness.ready:
            raise RuntimeError(f"agent {spec.name} not ready: {node.readiness.reason}")
        metrics = Metrics()
        server = make_server(AgentServicer(node.volumes, node.readiness, metrics), metrics)
        server.add_insecure_port(f"unix://{spec.socket}")
        server.start()
        servers.append(server)
    _announce({"pid": os.getpid(), "agents": [s.name for s in specs]})
    _wait_for_term()
    for server in servers:
        server.stop(None)


class MemoryRecords:
    """PlacementRecords in a dict: what the PVC annotations hold, without the API server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], tuple[str, str]] = {}

    def get(self, namespace: str, pvc: str) -> tuple[str, str] | None:
        with self._lock:
            return self._records.get((namespace, pvc))

    def put(self, namespace: str, pvc: str, name: str, node: str) -> None:
        with self._lock:
            self._records[(namespace, pvc)] = (name, node)


def _serve_controller(endpoint: str, agents: str, records: bool) -> None:
    from csi.main import _pool, controller_services, parser
    from csi.server import build_server
    from zvolt.rpc import parse_endpoint

    args = parser().parse_args(["--mode", "controller", "--insecure", "--endpoint", endpoint, "--agents", agents])
    services = controller_services(_pool(args), records=MemoryRecords() if records else None)
    server, _ = build_server(services, parse_endpoint(endpoint))
    server.start()
    _announce({"pid": os.getpid()})
    _wait_for_term()
    server.stop(None)


def _announce(doc: dict[str, Any]) -> None:
    print(json.dumps(doc), flush=True)


def _wait_for_term() -> None:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()


def child_main(argv: Sequence[str]) -> int:
    kind, spec = argv[0], json.loads(argv[1])
    if kind == "agents":
        _serve_agents([AgentSpec(**a) for a in spec["agents"]])
    elif kind == "controller":
        _serve_controller(spec["endpoint"], spec["agents"], bool(spec.get("records")))
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    return 0


# --- the parent side --------------------------------------------------------------------------


@dataclass
class Child:
    proc: subprocess.Popen[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process would never see SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(kind: str, spec: dict[str, Any], log: Path) -> Child:
    """Start a child (niced: the machine is shared); it has not announced itself yet."""
    with log.open("a") as err:
        proc = subprocess.Popen(
            ["nice", "-n", "10", sys.executable, "-m", "bench.clusteragents", kind, json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return Child(proc)


def wait_ready(children: Sequence[Child], timeout: float, tick: Callable[[int, int], None]) -> None:
    """Read each child's announcement; `tick(ready, total)` at least every 30 s."""
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    ready = 0
    for child in children:
        assert child.proc.stdout is not None
        while True:
            line = _readline(child, min(5.0, max(0.1, deadline - time.monotonic())))
            if line:
                child.info = json.loads(line)
                ready += 1
                break
            if child.proc.poll() is not None:
                raise RuntimeError(f"child {child.pid} exited with {child.proc.returncode} before serving "
                                   "(its stderr is in children.log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready} of {len(children)} children serving after {timeout:.0f} s")
            if time.monotonic() - last >= 25:
                tick(ready, len(children))
                last = time.monotonic()
        if time.monotonic() - last >= 25:
            tick(ready, len(children))
            last = time.monotonic()


def _readline(child: Child, timeout: float) -> str:
    import select

    assert child.proc.stdout is not None
    r, _, _ = select.select([child.proc.stdout], [], [], timeout)
    return child.proc.stdout.readline().strip() if r else ""


def copy_index(template: str, state: str) -> None:
    os.makedirs(state, mode=0o700, exist_ok=True)
    shutil.copyfile(os.path.join(template, "index.sqlite"), os.path.join(state, "index.sqlite"))


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
