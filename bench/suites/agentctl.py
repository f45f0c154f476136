"""The bench's own agent instance: same node name and socket as the lab's agent, but its own parent
dataset and state dir, so filling the pool to N objects never touches other tests' volumes.

The lab's standard agent is restarted with `--parent <pool>/benchagent --state-dir ...` appended
(the last flag wins) and put back as it was when the bench is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.guest import Guest
from bench.progress import Progress
from zvolt import commitment
from zvolt.pb import agent_pb2, agent_pb2_grpc

STATE_DIR = "/var/lib/zvolt-bench-agent"
READY_TIMEOUT_S = 3600.0


def agent_info(target: str, timeout: float = 30) -> Any:
    with grpc.insecure_channel(target) as ch:
        return agent_pb2_grpc.AgentStub(ch).GetInfo(agent_pb2.GetInfoRequest(), timeout=timeout)


@dataclass
class BenchAgent:
    guest: Guest
    progress: Progress
    parent: str
    active: bool = False
    was_running: bool = False
    unavailable: str = ""
    restarts: list[dict[str, Any]] = field(default_factory=list)
    # Seconds until the controller reaches the restarted agent: callers of the controller must not
    # meet its reconnect window (zvolt.rpc.RECONNECT_OPTIONS) as a failed call.
    reconnect: Callable[[], float] | None = None

    @property
    def extra(self) -> tuple[str, ...]:
        # The filler promises far more than the pool holds (thousands of 1 GiB thin volumes on a
        # lab pool of tens of GiB): the bench measures speed at that many objects, not admission,
        # so its agent takes the highest commitment ratio there is.
        return ("--parent", self.parent, "--state-dir", STATE_DIR,
                "--commitment-ratio", f"{commitment.MAX_RATIO:g}")

    def ensure(self) -> bool:
        """Switch the lab's agent to the bench parent (once). False when there is no agent to run."""
        if self.active:
            return True
        if self.unavailable:
            return False
        lab = self.guest.lab
        try:
            self.was_running = lab.service_running("agent")
            self.guest.call("ensure-parent", {"dataset": self.parent})
            self.restart()
        except Exception as e:
            self.unavailable = f"{type(e).__name__}: {e}"
            self.progress.say(f"bench agent not available, agent-side figures will be missing: {e}")
            return False
        self.active = True
        return True

    def restart(self) -> dict[str, Any]:
        """(Re)start and time until GetInfo says ready (index loaded, intents settled, exports restored).

        The clock runs inside the guest (bench.inguest agent-restart) so neither ssh nor the lab's
        socket polling is in the figure; `host_seconds` is the whole round trip for reference.
        """
        self.guest.lab.run(["mkdir", "-p", "/run/zvolt"])
        t0 = time.perf_counter()
        with self.progress.ticking("agent restart to ready"):
            out: dict[str, Any] = self.guest.call("agent-restart", self.restart_args(), timeout=READY_TIMEOUT_S + 300)
        out["host_seconds"] = time.perf_counter() - t0
        if self.reconnect is not None:
            out["controller_reconnect_seconds"] = self.reconnect()
        self.restarts.append(out)
        return out

    def restart_args(self) -> dict[str, Any]:
        """The arguments of `bench.inguest agent-restart` that (re)start this agent."""
        from lab.guest import SOCKETS, STORAGE_NS, agent_argv, systemd_run_argv, unit_name

        return {"stop_argv": ["systemctl", "stop", unit_name("agent")],
                "start_argv": systemd_run_argv("agent", [*agent_argv(), *self.extra], netns=STORAGE_NS),
                "socket": SOCKETS["agent"], "timeout": READY_TIMEOUT_S}

    def reindex(self) -> dict[str, Any]:
        """After filling behind the agent's back: the agent's explicit slow rebuild, then a restart."""
        from lab.guest import STORAGE_NS, agent_argv

        lab = self.guest.lab
        lab.stop_service("agent")
        t0 = time.perf_counter()
        with self.progress.ticking("agent index rebuild from ZFS"):
            lab.run([*agent_argv(), *self.extra, "--rebuild-index"], netns=STORAGE_NS, timeout=7200)
        rebuild_s = time.perf_counter() - t0
        return {"rebuild_seconds": rebuild_s, "restart": self.restart()}

    def restore(self, keep: bool = False) -> None:
        """Put the lab's standard agent back (or leave it stopped if it was not running); unless `keep`,
        destroy the bench parent and the bench agent's state."""
        if not self.active:
            return
        lab = self.guest.lab
        lab.stop_service("agent")
        if not keep:
            self.guest.call("zfs-destroy", {"dataset": self.parent, "recursive": True}, timeout=7200)
            lab.run(["rm", "-rf", "--one-file-system", STATE_DIR], netns="storage", timeout=600)
        if self.was_running:
            lab.start_agent()
        self.active = False
