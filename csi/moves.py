"""Drive an offline move of one volume between two agents (agent/moves.py has the protocol).

`move` reads where the volume is on both nodes and carries on from there, so a call repeated
after any crash (of either agent or of the caller) converges: streams the target already holds
are not sent again, a commit already made is not made again, a finished move is a no-op.
`abort` undoes a move that has not committed, target first, so that there are never two
writable copies. Pure: no state of its own; the caller gives it the two agents' clients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from csi import placement
from zvolt import names
from zvolt.errors import ZvoltError, precondition
from zvolt.pb import agent_pb2 as pb

# A live move's bulk streams go on while the volume is written, until one is smaller than this;
# then the final one (sent while the hosts wait) carries only what came in meanwhile. Lab, TCG: a
# 16 MiB final stream took 10.9 s, the bulk before it 31 s for 57 MB; at most MAX_BULK bulk streams,
# then the cutover comes anyway (a volume written faster than it streams). Offline moves write
# nothing: one stream, the final one.
SMALL_DELTA = 8 << 20
MAX_BULK = 5


class PathSwitch(Protocol):
    """The hosts' side of a live move (the node plugin's, csi/livepath.py)."""

    def hosts(self) -> list[pb.PublishVolumeRequest]:
        """What each host's ControllerPublish carried (host NQN, keys): the target allows the same."""
        ...

    def add(self, paths: list[pb.PublishVolumeResponse]) -> None:
        """Each host connects its second path (the target, no namespace yet). Raises when a host
        cannot (no native multipath): the move is then aborted before the cutover."""
        ...

    def drop(self, source: str) -> None:
        """After the move: each host lets go of its path to the source (gone already)."""
        ...


class AgentCaller(Protocol):
    """What csi/agents.py's AgentClient offers: a node name and a unary call."""

    name: str

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any: ...


@dataclass(frozen=True)
class MoveResult:
    volume_id: str  # local id (the CSI id stays "<home>/<id>")
    source: str
    target: str
    home: str
    bytes: int  # streamed by this call (0 for a repeat of a finished move)
    streams: int
    seconds: float
    # Live: from the fence of the source path to the target's namespace (the hosts' I/O waits).
    pause_seconds: float = 0.0


def _placement(agent: AgentCaller, vid: str) -> Any | None:
    try:
        return agent.call("GetVolume", pb.GetVolumeRequest(volume_id=vid))
    except ZvoltError as exc:
        if exc.code == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def _check_room(target: AgentCaller, vid: str, vol: Any) -> None:
    """Before anything changes: the target has the space and the commitment room for the volume."""
    cap = target.call("GetCapacity", pb.GetCapacityRequest())
    if cap.cordoned:
        raise precondition(f"storage node {target.name} is cordoned ({cap.cordon_reason}): it takes no volumes "
                           f"until `kubectl zvolt uncordon-storage {target.name}`. Nothing was changed")
    node = placement.from_capacity(target.name, "", cap)
    why = placement.move_in_refusal(node, vid, vol.size_bytes, vol.used_bytes)
    if why is not None:
        raise ZvoltError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{why}. Nothing was changed: the volume stays put")


def move(source: AgentCaller, target: AgentCaller, vid: str, stream_timeout: float = 3600.0,
         rate: int = 0, live: PathSwitch | None = None) -> MoveResult:
    """rate: bytes per second each stream may take on the target (0: no limit). live: move a
    published volume while it is in use (the hosts' paths switch at the cutover)."""
    names.check_id(vid)
    start = time.monotonic()
    if source.name == target.name:
        raise precondition(f"volume {vid} is already on storage node {target.name}")
    there = _placement(target, vid)
    here = _placement(source, vid)
    total = streams = 0
    is_live, fenced = False, 0.0
    home = (here.home_node if here is not None else "") or (there.home_node if there is not None else "")
    committed = there is not None and there.placement in (pb.PLACEMENT_HELD, pb.PLACEMENT_MOVING)
    if committed and here is not None and here.placement == pb.PLACEMENT_HELD:
        raise precondition(f"volume {vid} is held by both {source.name} and {target.name}: not a move of ours")
    if not committed:
        if here is None or here.placement == pb.PLACEMENT_MOVED:
            where = f"moved to {here.moved_to}" if here is not None else "not found"
            raise precondition(f"volume {vid} is {where} on storage node {source.name}, and {target.name} does "
                               "not hold it")
        if here.placement == pb.PLACEMENT_MOVING and here.moving_to != target.name:
            raise precondition(f"volume {vid} is being moved to {here.moving_to}, not {target.name}: abort that first")
        base = there.move_snapshot if there is not None else ""
        if there is None:
            _check_room(target, vid, here.volume)
        # Offline, nothing writes to the volume: it is frozen at once and goes in one stream.
        # Live, bulk streams go first while it is written, until what is left is small.
        published = list(here.volume.published_hosts)
        if published and live is None:
            raise precondition(f"volume {vid} is published to {', '.join(published)}: an offline move needs it "
                               "unpublished (stop the pods using it), or move it live")
        is_live = bool(published)
        if not (there is not None and there.move_final):
            cntlid = 0
            for _ in range(MAX_BULK if is_live else 0):
                plan = source.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node=target.name,
                                                                  base_snapshot=base, live=True))
                got = _stream(source, target, vid, plan, stream_timeout, rate)
                total, streams, base, cntlid = total + got, streams + (1 if got else 0), plan.snapshot, plan.cntlid_min
                if got < SMALL_DELTA:
                    break  # the next stream is the final one: nothing much is left to send frozen
            if is_live and live is not None:
                _add_paths(source, target, vid, live, cntlid)
            fenced = time.monotonic()
            plan = source.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node=target.name,
                                                              base_snapshot=base, final=True, live=is_live))
            got = _stream(source, target, vid, plan, stream_timeout, rate)
            total, streams = total + got, streams + (1 if got else 0)
    # Also when committed already: a repeat tidies what a crash right after the commit left.
    target.call("CommitMove", pb.CommitMoveRequest(volume_id=vid, source_node=source.name))
    pause = time.monotonic() - fenced if fenced and is_live else 0.0
    source.call("FinishMove", pb.FinishMoveRequest(volume_id=vid, target_node=target.name))
    if live is not None and (is_live or committed):
        live.drop(source.name)
    return MoveResult(vid, source.name, target.name, home, total, streams, time.monotonic() - start, pause)


def _add_paths(source: AgentCaller, target: AgentCaller, vid: str, live: PathSwitch, cntlid: int) -> None:
    """The target's subsystem, then each host's second path to it; if a host cannot add one, the
    move is undone before anything was fenced (the volume serves from the source as before)."""
    prepared = target.call("PrepareMove", pb.PrepareMoveRequest(volume_id=vid, source_node=source.name,
                                                                hosts=live.hosts(), source_cntlid_min=cntlid))
    try:
        live.add(list(prepared.paths))
    except ZvoltError as exc:
        abort(source, target, vid)
        raise precondition(f"volume {vid} cannot move live: {exc.message}. The move was undone and the volume "
                           "serves from storage node " + source.name + "; move it offline (unpublished) "
                           "instead") from exc


def _stream(source: AgentCaller, target: AgentCaller, vid: str, plan: Any, timeout: float, rate: int = 0) -> int:
    if plan.snapshot == plan.base_snapshot:
        return 0  # frozen before, and the target holds the final stream already
    got = target.call("ReceiveMove", pb.ReceiveMoveRequest(
        volume_id=vid, home_node=plan.home_node, source_node=source.name, address=plan.address, token=plan.token,
        snapshot=plan.snapshot, base_snapshot=plan.base_snapshot, max_bytes_per_second=rate), timeout=timeout)
    return int(got.bytes)


def abort(source: AgentCaller, target: AgentCaller, vid: str) -> None:
    """Undo a move that has not committed: the target's copy goes first, then the source is
    writable again. A target that committed refuses, and then the source is left frozen."""
    names.check_id(vid)
    target.call("AbortMove", pb.AbortMoveRequest(volume_id=vid, role=pb.MOVE_ROLE_TARGET))
    source.call("AbortMove", pb.AbortMoveRequest(volume_id=vid, role=pb.MOVE_ROLE_SOURCE))
