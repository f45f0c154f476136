"""`zvolt-csi --mode move --volume-id <id> --to <node>`: what `kubectl zvolt move` runs.

Like `rotate-key`, only the controller reaches the agents, so the plugin runs this mode in the
controller container with its settings. The volume is found where it is now (csi/locator.py: its
id names its home, which it may have left), then csi/moves.py moves it, one progress line per
step. A rerun after any interruption carries on from where the two nodes are. The CSI ids stay
as they are: the serving controller follows the volume by the tombstone the source keeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from csi import moves
from csi.agents import AgentPool, fan_out
from csi.locator import Locator
from zvolt.errors import precondition
from zvolt.names import check_node, split_volume_id

# What a step of csi/moves.py does, in the words of a progress line.
STEPS = {
    "SendMove": "source snapshots it",
    "PrepareMove": "target prepares the hosts' second path (no namespace yet)",
    "ReceiveMove": "target receives",
    "CommitMove": "target commits (the one true copy from now on)",
    "FinishMove": "source drops its copy, keeps a tombstone",
}


@dataclass(frozen=True)
class Outcome:
    volume_id: str
    source: str
    target: str
    bytes: int
    streams: int
    seconds: float
    already: bool = False  # held by the target before this call: nothing done


class Narrated:
    """An agent client that reports each move step (its time, and what a stream carried), each
    line after `prefix`; `streaming(target or None)` is told when a stream starts and ends."""

    def __init__(self, agent: Any, say: Callable[[str], None], prefix: str = "",
                 streaming: Callable[[str | None], None] | None = None) -> None:
        self._agent = agent
        self._say = say
        self._prefix = prefix
        self._streaming = streaming
        self.name: str = agent.name

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        start = time.monotonic()
        streaming = self._streaming if method == "ReceiveMove" else None
        if streaming is not None:
            streaming(self.name)
        try:
            got = self._agent.call(method, request, timeout=timeout)
        finally:
            if streaming is not None:
                streaming(None)
        if method in STEPS:
            carried = f", {got.bytes} bytes" if method == "ReceiveMove" else ""
            self._say(f"  {self._prefix}{self.name}: {STEPS[method]} ({time.monotonic() - start:.1f}s{carried})")
        return got


# A live move's host steps for one volume (csi/pathrelay.py): built from the source's record of it.
LiveSwitch = Callable[[str, Any], moves.PathSwitch]


def move(pool: AgentPool, volume_id: str, to: str, say: Callable[[str], None] = print,
         live: LiveSwitch | None = None) -> Outcome:
    """live: how to switch the hosts' paths, so that a published volume moves while in use."""
    home, local = split_volume_id(volume_id)
    check_node(to)
    target = pool.find(to)
    if target is None:
        known = ", ".join(a.name for a in pool.all()) or "none"
        raise precondition(f"storage node {to} is unknown to the controller (storage nodes: {known})")
    source, vol = Locator(pool, fan_out).get_volume(home, local)
    if source.name == to:
        say(f"volume {volume_id} is on storage node {to} already")
        return Outcome(volume_id, to, to, 0, 0, 0.0, already=True)
    # The agent refuses what cannot move and names it (clones, encrypted); published, the common
    # one, is said before anything changes on either node.
    switch = None
    if vol.published_hosts:
        if live is None:
            raise precondition(f"volume {volume_id} is published to {', '.join(vol.published_hosts)}: an offline "
                               "move needs it unpublished (stop the pods using it); `kubectl zvolt move` moves it live")
        switch = live(volume_id, vol)
        say(f"volume {volume_id} is published to {len(vol.published_hosts)} host(s): moving it live (each host "
            f"adds a path to {to} before the cutover)")
    say(f"moving volume {volume_id} ({vol.size_bytes} bytes) from storage node {source.name} to {to}")
    result = moves.move(Narrated(source, say), Narrated(target, say), local, live=switch)
    paused = f"; the hosts' I/O waited {result.pause_seconds:.1f}s at the cutover" if result.pause_seconds else ""
    say(f"moved volume {volume_id} to storage node {to}: {result.bytes} bytes in {result.streams} stream(s), "
        f"{result.seconds:.1f}s{paused}")
    return Outcome(volume_id, source.name, to, result.bytes, result.streams, result.seconds)
