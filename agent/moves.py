"""Move an unpublished volume, with its snapshots, to another storage node (offline move).

The steps (csi/moves.py drives them over the two agents' APIs; each is idempotent):
1. source `send`: records MOVING_TO=<target> (intent, property, index row), takes a hidden move
   snapshot and hands out a one-time token for the stream from the target's last move snapshot
   (`zfs send -R -I`: the volume's CSI snapshots and properties go with it).
   target `receive`: dials the source's move port with the token and pipes the stream into
   `zfs receive` as an INCOMING dataset (readonly, not indexed, so never exported).
2. source `send(final=True)`: readonly=on, then the final move snapshot (marked FINAL), streamed
   the same way.
3. target `commit`: refused unless its newest move snapshot is the FINAL one; then ONE `zfs set`
   of state=held + readonly=off (a single sync task: atomic). This is the commit point.
4. source `finish`: MOVED_TO=<target> (the tombstone), index rows gone, data destroyed.
Abort before 3: the target destroys the incoming dataset, THEN the source clears readonly; the
target refuses an abort after 3, the source after 4, so there are never two writable copies.

The source is the only writable copy until 3 (it is unpublished and, from 2, readonly); a crash
anywhere leaves properties that recovery reads back, and the orchestrator's retry goes on.

Live move (`live=True`: the volume stays published and in use; agent/exports.py has the NVMe
side): step 1 also gives the volume's namespace an ANA group of its own, and streams repeat
while the volume is written. Before step 2 the target `prepare`s the subsystem under the same
NQN for the same hosts (no namespace yet) and each host adds it as a second path. Step 2 fences
the source path first (hosts hold their I/O; no completion reaches them after it), then freezes
and streams the small final delta; step 3 enables the target's namespace, where the hosts
resume; step 4 removes the source's export. Between the fence and the commit the hosts wait:
that is the pause a live move costs. An abort before 3 also lifts the fence.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from agent.dhchap import HostSecrets
from agent.index import MoveRec, VolumeRec
from agent.nvmet import NvmetError
from agent.records import HELD, HOME, INCOMING, MOVE_FROM, MOVED_TO, MOVING_TO, STATE, refresh
from agent.volumes import Volumes
from agent.zfs import Streams, ZfsError, get_props_many, retry_busy
from zvolt import names
from zvolt.errors import ZvoltError, internal, not_found, precondition, unavailable
from zvolt.storagenet import MOVE_PORT

_log = logging.getLogger("zvolt.agent.moves")

MOVE_SNAP = "zmv"  # hidden move snapshots: zmv000001, zmv000002, ... (name order = age)
FINAL = "zvolt:move-final"
TOKEN_TTL = 600.0
_HELLO = b"ZVMOVE1 "
_BUF = 1 << 20
PROGRESS_EVERY = 5.0
DEFAULT_MOVE_PORT = MOVE_PORT
SOURCE, TARGET = "source", "target"


def _published(vol: VolumeRec) -> str:
    return (f"volume {vol.id} is published to {', '.join(vol.hosts)}: an offline move needs it unpublished "
            "(stop the pods using it), or move it live")


def is_move_snapshot(snapshot: str) -> bool:
    return snapshot.partition("@")[2].startswith(MOVE_SNAP)


@dataclass(frozen=True)
class Grant:
    volume_id: str
    target: str
    snapshot: str  # full ZFS names
    base: str
    expires: float


@dataclass(frozen=True)
class SendPlan:
    token: str
    address: str
    snapshot: str  # short names ("zmv000002")
    base: str
    home: str
    cntlid: tuple[int, int] = (0, 0)  # live: the controller ids the source's subsystem gives out


@dataclass(frozen=True)
class LivePath:
    """Where a host finds a live move's target: what PublishVolume would have answered."""

    nqn: str
    host_nqn: str  # as allowed on the target (a per-volume NQN when the host authenticates)
    tls: bool


@dataclass(frozen=True)
class MoveCheck:
    """Whether a volume could start a move now (Moves.check)."""

    volume_id: str
    moving_to: str = ""  # a move under way carries on to this node
    blocked: str = ""  # what keeps it from moving, in words a user can act on
    missing: bool = False  # not held here


@dataclass(frozen=True)
class OnDisk:
    """A volume's dataset as a move step finds it (Moves._state)."""

    props: dict[str, str] | None  # None: no such dataset
    snapshots: list[str]  # all of them, full names, in name order
    finals: frozenset[str]  # the move snapshots taken frozen

    @property
    def moves(self) -> list[str]:
        return [s for s in self.snapshots if is_move_snapshot(s)]


@dataclass(frozen=True)
class Placement:
    state: str  # "held" | "moving" | "moved" | "incoming"
    home: str = ""
    peer: str = ""  # moving/moved: the target; incoming: the source
    snapshot: str = ""  # incoming: newest move snapshot received
    final: bool = False


@dataclass
class Grants:
    """One-time, short-lived tokens for a stream of one volume to one target (in memory: a
    restarted source simply issues new ones on the retry)."""

    clock: Callable[[], float] = time.monotonic
    ttl: float = TOKEN_TTL
    _by_token: dict[str, Grant] = field(default_factory=dict)
    _mu: threading.Lock = field(default_factory=threading.Lock)

    def issue(self, volume_id: str, target: str, snapshot: str, base: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._mu:
            now = self.clock()
            for old in [t for t, g in self._by_token.items() if g.expires < now]:
                del self._by_token[old]
            self._by_token[token] = Grant(volume_id, target, snapshot, base, now + self.ttl)
        return token

    def take(self, token: str) -> Grant:
        with self._mu:
            grant = self._by_token.pop(token, None)
        if grant is None or grant.expires < self.clock():
            raise precondition("move token is unknown, used or expired: ask the source for a new one")
        return grant


class Moves:
    def __init__(self, volumes: Volumes, streams: Streams, address: str, grants: Grants | None = None,
                 tls_server: ssl.SSLContext | None = None, tls_client: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.v = volumes
        self.zfs = volumes.zfs
        self.index = volumes.index
        self.streams = streams
        self.address = address  # host:port of this node's move port (what a target dials)
        self.grants = grants or Grants()
        self.tls_server = tls_server
        self.tls_client = tls_client
        self._clock = clock

    @property
    def node(self) -> str:
        return self.v.cfg.node

    def _dataset(self, vid: str) -> str:
        return self.v.layout.volume(names.check_id(vid))

    def _state(self, ds: str, props: tuple[str, ...] = ()) -> OnDisk:
        """The dataset's `props` and its snapshots, which of them are FINAL: one read (none when
        the dataset does not exist: a target's first look at an incoming volume, an ioctl)."""
        if not self.zfs.exists(ds):
            return OnDisk(None, [], frozenset())
        found = self.zfs.with_snapshots(ds, (FINAL, *props))
        head = found.pop(ds, None)
        snaps = sorted(found)
        return OnDisk(None if head is None else {p: head.get(p, "-") for p in props}, snaps,
                      frozenset(s for s in snaps if found[s].get(FINAL) == "1"))

    # -- where a volume is --------------------------------------------------------------------

    def placement(self, vid: str) -> Placement:
        """Held here, moving out, moved away (tombstone) or incoming; NOT_FOUND otherwise."""
        names.check_id(vid)
        move = self.index.move(vid)
        vol = self.index.volume(vid)
        if vol is not None:
            home = vol.home or self.node
            return Placement("moving", home, move.peer) if move is not None else Placement("held", home)
        ds = self._dataset(vid)
        state = self._state(ds, (STATE, HOME, MOVE_FROM))
        props = state.props
        if props is not None and props.get(STATE) == INCOMING:
            snaps = state.moves
            last = snaps[-1] if snaps else ""
            return Placement("incoming", props.get(HOME, ""), props.get(MOVE_FROM, ""),
                             last.partition("@")[2], last in state.finals)
        if move is not None and move.state == "moved":
            return Placement("moved", peer=move.peer)
        raise not_found(f"volume {vid} does not exist on storage node {self.node}")

    # -- source -------------------------------------------------------------------------------

    def _check_movable(self, vol: VolumeRec, state: OnDisk, live: bool = False) -> None:
        """Refuse what this round cannot move, naming exactly what blocks it."""
        if vol.hosts and not live:
            raise precondition(_published(vol))
        why = self._blockers(vol, (state.props or {}).get("encryption", "off"))
        if why:
            raise precondition(why)

    def _blockers(self, vol: VolumeRec, encryption: str) -> str:
        """What keeps `vol` from moving at all (its family, its encryption), or ""."""
        blockers = []
        if vol.origin:
            blockers.append(f"it is a clone of {vol.origin.rpartition('/')[2]}")
        clones = self.index.clones_of(vol.dataset)
        if clones:
            blockers.append(f"clones of its snapshots exist: {', '.join(c.rpartition('/')[2] for c in clones)}")
        if encryption not in ("off", "-", ""):
            blockers.append("it is encrypted (moving encrypted volumes is not supported yet)")
        if not blockers:
            return ""
        return (f"volume {vol.id} cannot move: {'; '.join(blockers)}. Branch families move as a unit in a later "
                "release: delete or move the dependents first")

    def check(self, vids: Sequence[str]) -> list[MoveCheck]:
        """Whether `send` would start a move of each volume now (a drain's plan asks, a page at
        a time): what blocks it, or the target of its move under way (which carries on). Read
        only and unlocked: `send` checks again under the volume's lock. One `zfs get` for all."""
        for vid in vids:
            names.check_id(vid)
        found: dict[str, VolumeRec] = {}
        out: dict[str, MoveCheck] = {}
        for vid in vids:
            move = self.index.move(vid)
            vol = self.index.volume(vid)
            if vol is None:
                out[vid] = MoveCheck(vid, missing=True)
            elif move is not None:
                out[vid] = MoveCheck(vid, moving_to=move.peer)
            elif vol.hosts:
                out[vid] = MoveCheck(vid, blocked=_published(vol))
            else:
                found[vid] = vol
        crypt = get_props_many(self.zfs, [vol.dataset for vol in found.values()], ("encryption",))
        for vid, vol in found.items():
            # A dataset gone since the index row was read is deleted: its listing says so next time.
            encryption = crypt.get(vol.dataset, {}).get("encryption", "off")
            out[vid] = MoveCheck(vid, blocked=self._blockers(vol, encryption))
        return [out[vid] for vid in vids]

    def _outgoing(self, vid: str) -> tuple[VolumeRec, MoveRec | None]:
        """The volume a move from here would send, and its move under way (under its lock)."""
        move = self.index.move(vid)
        if move is not None and move.state == "moved":
            raise precondition(f"volume {vid} moved to storage node {move.peer} already")
        vol = self.index.volume(vid)
        if vol is None:
            raise not_found(f"volume {vid} does not exist on storage node {self.node}")
        return vol, move

    def send(self, vid: str, target: str, base: str = "", final: bool = False, live: bool = False) -> SendPlan:
        """Step 1 (final=False) or 2 (final=True): a move snapshot and a token for its stream.
        live: the volume may be published; its path is isolated at the start, fenced at step 2."""
        names.check_id(vid)
        names.check_node(target)
        if base:
            names.check_id(base, "move snapshot")
        if target == self.node:
            raise precondition(f"volume {vid} is already on storage node {target}")
        with self.v.locks.hold([vid]):
            vol, move = self._outgoing(vid)
            if move is not None and move.peer != target:
                raise precondition(f"volume {vid} is being moved to {move.peer}: abort that move first")
            state = self._state(vol.dataset, ("encryption",))
            # Offline and final at once (nothing writes to it): the start and the freeze are one `zfs set`.
            frozen = move is None and final and not vol.hosts
            if move is None:
                self._check_movable(vol, state, live)
                self._start(vol, target, freeze=frozen)
            elif vol.hosts:
                self._check_movable(vol, state, live)  # published during the move is refused; say so if it happened
            if vol.hosts:
                self._isolate(vol)  # also on a repeat: a reboot since loses configfs state
            snaps = state.moves
            if base and f"{vol.dataset}@{base}" not in snaps:
                raise precondition(f"the target holds move snapshot {base} of volume {vid}, which the source does "
                                   "not have: abort the move and start again")
            finals = [s for s in snaps if s in state.finals]
            if finals:
                snap = finals[-1]  # frozen already: nothing can have changed since
            elif final:
                if vol.hosts:
                    self._fence(vol)  # before the freeze: no host may see a write fail
                if not frozen:
                    self._freeze(vol)
                snap = self._snapshot(vol, snaps, final=True)
            else:
                snap = self._snapshot(vol, snaps, final=False)
            full_base = f"{vol.dataset}@{base}" if base else ""
            token = self.grants.issue(vid, target, snap, full_base)
            cntlid = self.v.exports.cntlid_range(vid) if vol.hosts else (0, 0)
            return SendPlan(token, self.address, snap.partition("@")[2], base, vol.home or self.node, cntlid)

    def _isolate(self, vol: VolumeRec) -> None:
        try:
            self.v.exports.isolate(vol.id)
        except (OSError, NvmetError) as exc:
            raise internal(f"giving volume {vol.id} an ANA group of its own for its live move: {exc}") from exc

    def _fence(self, vol: VolumeRec) -> None:
        try:
            self.v.exports.fence(vol.id)
        except (OSError, NvmetError) as exc:
            raise internal(f"fencing the path of volume {vol.id} for its live move: {exc}") from exc
        _log.info("live move fenced", extra={"fields": {"volume": vol.id, "hosts": len(vol.hosts)}})

    def _start(self, vol: VolumeRec, target: str, freeze: bool = False) -> None:
        """Record the move (intent, property, index row); `freeze`: readonly in the same `zfs set`
        (a crash after it reads back as a move frozen already)."""
        seq = self.index.begin("move-start", [vol.dataset])
        try:
            self.zfs.set_props(vol.dataset, {MOVING_TO: target, **({"readonly": "on"} if freeze else {})})
        except ZfsError as exc:
            self.v._settle(seq, [vol.dataset])
            raise internal(f"starting the move of volume {vol.id}: {exc}") from exc
        with self.index.tx() as tx:
            tx.put_move(MoveRec(vol.id, "moving", target))
            tx.done(seq)

    def _freeze(self, vol: VolumeRec) -> None:
        try:
            self.zfs.set_props(vol.dataset, {"readonly": "on"})
        except ZfsError as exc:
            raise internal(f"freezing volume {vol.id} for its move: {exc}") from exc

    def _snapshot(self, vol: VolumeRec, existing: list[str], final: bool) -> str:
        last = int(existing[-1].partition("@")[2].removeprefix(MOVE_SNAP)) if existing else 0
        snap = f"{vol.dataset}@{MOVE_SNAP}{last + 1:06d}"
        props = {"zvolt:hidden": "1", "zvolt:created": str(int(self._clock())), **({FINAL: "1"} if final else {})}
        try:
            self.zfs.snapshot([snap], props)
        except ZfsError as exc:
            raise internal(f"move snapshot of volume {vol.id}: {exc}") from exc
        return snap

    def finish(self, vid: str, target: str) -> None:
        """Step 4, after the target committed: the tombstone, then the data goes."""
        names.check_id(vid)
        names.check_node(target)
        with self.v.locks.hold([vid]):
            move = self.index.move(vid)
            ds = self._dataset(vid)
            if move is None:
                raise precondition(f"volume {vid} is not being moved from storage node {self.node}")
            if move.peer != target:
                raise precondition(f"volume {vid} is being moved to {move.peer}, not {target}")
            state = self._state(ds)
            if move.state == "moving":
                if not state.finals:
                    raise precondition(f"volume {vid} was never frozen for its move: the target cannot have "
                                       "committed it")
                vol = self.index.volume(vid)
                if vol is not None and vol.hosts:
                    self._unexport(vid, vol.hosts)  # a live move's old path; first, so a repeat redoes it
                rows = self.index.snapshots_in(ds)
                named = [ds, *[r.dataset for r in rows]]
                seq = self.index.begin("move-finish", named)
                try:
                    self.zfs.set_props(ds, {MOVED_TO: target})
                except ZfsError as exc:
                    self.v._settle(seq, named)
                    raise internal(f"recording that volume {vid} moved: {exc}") from exc
                with self.index.tx() as tx:
                    for snap in rows:
                        tx.del_snapshot(snap.id)
                    tx.del_volume(vid)
                    tx.put_move(MoveRec(vid, "moved", target))
                    tx.done(seq)
            if state.props is not None:
                self._destroy(ds, state.snapshots)

    def _unexport(self, vid: str, hosts: list[str]) -> None:
        try:
            self.v.exports.unexport(vid)
        except OSError as exc:
            raise internal(f"removing the NVMe export of volume {vid}: {exc}") from exc
        if self.v.exports.auth is not None:
            for h in hosts:
                self.v.exports.auth.forget(h)

    def _destroy(self, ds: str, snaps: list[str] | None = None) -> None:
        """Nothing depends on a moved volume (clones refuse the move): its data goes at once.
        snaps: its snapshots, when the caller read them already (under the volume's lock)."""
        if snaps is None:
            if not self.zfs.exists(ds):
                return
            snaps = self.zfs.snapshots_of(ds)
        try:
            if snaps:
                self.zfs.destroy_snapshots(snaps, defer=True)
            retry_busy(lambda: self.zfs.destroy(ds), self.zfs)
        except ZfsError as exc:
            # The tombstone is recorded; a repeat of the call (or of the move's finish) retries this.
            raise internal(f"destroying the moved copy {ds}: {exc}") from exc

    def abort(self, vid: str, role: str) -> None:
        """Undo a move before its commit: the target's copy first, then (a second call) the source."""
        names.check_id(vid)
        with self.v.locks.hold([vid]):
            if role == TARGET:
                self._abort_incoming(vid)
            elif role == SOURCE:
                self._abort_outgoing(vid)
            else:
                raise precondition(f"abort of a move needs the role {SOURCE!r} or {TARGET!r}")

    def _abort_outgoing(self, vid: str) -> None:
        move = self.index.move(vid)
        if move is None:
            return
        if move.state == "moved":
            raise precondition(f"volume {vid} moved to {move.peer} and was committed there: it cannot be aborted")
        ds = self._dataset(vid)
        seq = self.index.begin("move-abort", [ds])
        try:
            snaps = self._state(ds).moves
            if snaps:
                self.zfs.destroy_snapshots(snaps, defer=True)
            self.zfs.set_props(ds, {"readonly": "off", MOVING_TO: "-"})
            vol = self.index.volume(vid)
            if vol is not None and vol.hosts:
                self.v.exports.unfence(vid)  # writable first: the hosts resume here at once
        except (ZfsError, OSError) as exc:
            self.v._settle(seq, [ds])
            raise internal(f"aborting the move of volume {vid}: {exc}") from exc
        with self.index.tx() as tx:
            tx.del_move(vid)
            tx.done(seq)

    def _abort_incoming(self, vid: str) -> None:
        if self.index.volume(vid) is not None:
            raise precondition(f"volume {vid} is held by storage node {self.node} (committed): it cannot be aborted")
        ds = self._dataset(vid)
        props = self.zfs.get_props(ds, (STATE,))
        if props is None:
            return
        if props.get(STATE) != INCOMING:
            raise precondition(f"dataset {ds} is not an incoming move: refusing to destroy it")
        seq = self.index.begin("move-abort", [ds])
        try:
            sub = self.v.exports.root.subsystem(self.v.exports.nqn(vid))
            if sub.exists():  # a live move's prepared path: the hosts' second controllers end
                self._unexport(vid, sub.allowed_hosts())
            self.v.exports.set_home(vid, "")
            self._destroy(ds)
        finally:
            with self.index.tx() as tx:
                tx.done(seq)

    # -- target -------------------------------------------------------------------------------

    def receive(self, vid: str, home: str, source: str, address: str, token: str, snapshot: str,
                base: str = "", rate: int = 0) -> int:
        """Step 1/2 on the target: fetch one stream into the incoming dataset. Returns bytes.
        rate: bytes per second the stream may take (0: as fast as it comes)."""
        names.check_id(vid)
        names.check_node(home)
        names.check_node(source)
        names.check_id(snapshot, "move snapshot")
        if base:
            names.check_id(base, "move snapshot")
        host, port = _split_address(address)
        with self.v.locks.hold([vid]):
            if self.index.volume(vid) is not None:
                raise precondition(f"volume {vid} is held by storage node {self.node} already")
            ds = self._dataset(vid)
            state = self._state(ds, (STATE, MOVE_FROM))
            props = state.props
            have = ""
            if props is None and (refused := self.v.cordon.refusal()):
                raise precondition(refused)  # a move in places a volume; one under way may finish
            if props is not None:
                if props.get(STATE) != INCOMING or props.get(MOVE_FROM) != source:
                    raise precondition(f"dataset {ds} exists and is not an incoming move from {source}")
                snaps = state.moves
                have = snaps[-1].partition("@")[2] if snaps else ""
            if have == snapshot:
                return 0  # a repeat: this stream arrived already
            if props is not None and not have and not base:
                # A full stream cut after its first snapshots (`zfs send -R` sends them one by one):
                # only a copy in the making, so it goes and the stream starts again.
                self._destroy(ds)
            if have != base:
                raise precondition(f"the stream starts at {base or 'nothing'} but storage node {self.node} holds "
                                   f"{have or 'nothing'} of volume {vid}: ask the source again from there")
            seq = self.index.begin("move-receive", [ds])
            try:
                moved = self._fetch(host, port, token, ds, {
                    STATE: INCOMING, MOVE_FROM: source, HOME: home, "readonly": "on", "volmode": "none"}, rate)
            finally:
                with self.index.tx() as tx:
                    tx.done(seq)
            if not self.zfs.exists(f"{ds}@{snapshot}"):
                raise internal(f"the stream of volume {vid} ended without snapshot {snapshot}")
            return moved

    def _fetch(self, host: str, port: int, token: str, ds: str, props: dict[str, str], rate: int = 0) -> int:
        try:
            sock = socket.create_connection((host, port), timeout=30)
        except OSError as exc:
            raise unavailable(f"cannot reach the source's move port {host}:{port}: {exc}") from exc
        _keepalive(sock)
        if self.tls_client is not None:
            try:
                sock = self.tls_client.wrap_socket(sock)
            except OSError as exc:  # ssl.SSLError included: a certificate this node's CA did not sign
                sock.close()
                raise unavailable(f"TLS to the source's move port {host}:{port} failed: {exc}") from exc
        with sock:
            sock.sendall(_HELLO + token.encode() + b"\n")
            status = _read_line(sock)
            if status != b"OK":
                raise precondition(f"the source refused the stream: {status.decode(errors='replace')[:300]}")
            read_fd, write_fd = os.pipe()
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(120)
                counter = _Pump(sock.recv_into, write_fd, f"receiving {ds}", rate)
            else:
                # Blocking (splice needs it); keepalive ends the wait for a peer that died.
                sock.settimeout(None)
                counter = _Pump(_spliced(sock.fileno(), write_fd), write_fd, f"receiving {ds}", rate)
            pump = threading.Thread(target=counter.run, name="move-recv", daemon=True)
            pump.start()
            try:
                self.streams.receive(ds, props, [MOVING_TO, MOVED_TO], read_fd)
            except ZfsError as exc:
                if counter.error and not counter.sink_closed:
                    # The network, not ZFS: `zfs receive` failed because the stream stopped coming
                    # (a cut link ends here once TCP keepalive gives up on the silent source).
                    raise _broken(host, port, ds, f"{counter.error}; zfs receive: {exc}") from exc
                raise internal(f"receiving into {ds}: {exc}" + (f" (stream: {counter.error})" if counter.error else "")
                               ) from exc
            finally:
                os.close(read_fd)
                pump.join(timeout=30)
            if counter.error:
                raise _broken(host, port, ds, counter.error)
            return counter.total

    def prepare(self, vid: str, source: str, hosts: list[tuple[str, HostSecrets | None]],
                source_cntlid_min: int) -> list[LivePath]:
        """A live move's target, before the final stream: the volume's subsystem for exactly the
        hosts the volume is published to (each with the keys its publish had), so that each can
        connect its second path now. The namespace follows at the commit. Idempotent."""
        names.check_id(vid)
        names.check_node(source)
        with self.v.locks.hold([vid]):
            if self.index.volume(vid) is not None:
                raise precondition(f"volume {vid} is held by storage node {self.node} already")
            ds = self._dataset(vid)
            props = self.zfs.get_props(ds, (STATE, MOVE_FROM, HOME, "zvolt:hosts"))
            if props is None or props.get(STATE) != INCOMING or props.get(MOVE_FROM) != source:
                raise precondition(f"volume {vid} is not being received from {source} on storage node {self.node}: "
                                   "send its first stream before preparing the live path")
            allowed = {(names.volume_host_nqn(h, vid) if auth is not None else names.check_nqn(h)): auth
                       for h, auth in hosts}
            published = sorted(h for h in props.get("zvolt:hosts", "").split(",") if h and h != "-")
            if sorted(allowed) != published:
                raise precondition(f"volume {vid} is published to {published or 'no host'} on {source}, but the "
                                   f"live move was given {sorted(allowed) or 'no host'}: they must be the same")
            store = self.v.exports.auth
            if any(auth is not None for auth in allowed.values()) and store is None:
                raise precondition(f"storage node {self.node} keeps no DH-HMAC-CHAP keys or TLS PSKs")
            for h, auth in allowed.items():
                if auth is not None and store is not None:
                    store.put(replace(auth, host=h))
            self.v.exports.set_home(vid, props.get(HOME, "") or source)
            try:
                tls = self.v.exports.prepare_incoming(vid, sorted(allowed), source_cntlid_min)
            except OSError as exc:
                raise internal(f"preparing the live path of volume {vid}: {exc}") from exc
            nqn = self.v.exports.nqn(vid)
            return [LivePath(nqn, h, tls) for h in sorted(allowed)]

    def commit(self, vid: str, source: str) -> VolumeRec:
        """Step 3: THE commit point. Idempotent: a committed volume is returned as it is."""
        names.check_id(vid)
        names.check_node(source)
        with self.v.locks.hold([vid]):
            ds = self._dataset(vid)
            held = self.index.volume(vid)
            if held is not None:
                # A repeat, maybe after a crash right after the commit: its move snapshots may be left.
                self._serve(held)
                self._drop_move_snaps(ds, None)
                return held
            state = self._state(ds, (STATE, MOVE_FROM))
            props = state.props
            if props is None:
                raise not_found(f"nothing of volume {vid} was received on storage node {self.node}")
            if props.get(STATE) != INCOMING or props.get(MOVE_FROM) != source:
                raise precondition(f"dataset {ds} is not an incoming move from {source}")
            snaps = state.snapshots
            moves = state.moves
            if not moves or moves[-1] not in state.finals:
                raise precondition(f"the final stream of volume {vid} (taken after the source froze it) has not "
                                   "arrived: commit refused, the source is still the one true copy")
            seq = self.index.begin("move-commit", [ds, *[s for s in snaps if not is_move_snapshot(s)]])
            try:
                self.zfs.set_props(ds, {STATE: HELD, "readonly": "off"})  # the commit point
            except ZfsError as exc:
                self.v._settle(seq, [ds])
                raise internal(f"committing volume {vid}: {exc}") from exc
            with self.index.tx() as tx:
                rec = refresh(tx, self.zfs, self.v.layout, ds)
                for snap in snaps:
                    if not is_move_snapshot(snap):
                        refresh(tx, self.zfs, self.v.layout, snap)
                tx.del_move(vid)  # this node's tombstone of an earlier move away, if any
                tx.done(seq)
            if not isinstance(rec, VolumeRec):
                raise internal(f"volume {vid} was committed but its properties do not make a volume")
            self.v.exports.set_home(vid, rec.home)
            self._serve(rec)
            self._drop_move_snaps(ds, moves)
            _log.info("move committed", extra={"fields": {"volume": vid, "from": source}})
            return rec

    def _serve(self, vol: VolumeRec) -> None:
        """A live move's last step on the target: the namespace, where the hosts' held I/O resumes."""
        if not vol.hosts:
            return
        if self.v.exports.condition(vol.id, vol.dataset, vol.hosts)[0]:
            return
        store = self.v.exports.auth
        keyless = [h for h in vol.hosts if names.node_host_nqn(h, vol.id) != h
                   and (store is None or store.load(h) is None)]
        if keyless:
            # Never export an authenticated volume without its keys: PrepareMove brings them.
            raise precondition(f"volume {vol.id} was committed here, but the keys of {', '.join(keyless)} were never "
                               "given (PrepareMove): it stays unexported until they are")
        try:
            self.zfs.set_props(vol.dataset, {"volmode": "dev"})
            self.v.exports.export(vol.id, vol.dataset, vol.hosts)
        except (ZfsError, OSError) as exc:
            raise internal(f"volume {vol.id} was committed here but exporting it failed: {exc}; repeat the "
                           "commit") from exc
        _log.info("live move served", extra={"fields": {"volume": vol.id, "hosts": len(vol.hosts)}})

    def _drop_move_snaps(self, ds: str, moves: list[str] | None) -> None:
        """moves: the move snapshots, when the caller read them already (under the volume's lock)."""
        with contextlib.suppress(ZfsError):  # hidden and harmless if left; a repeat or a delete takes them
            if moves is None:
                moves = self._state(ds).moves
            if moves:
                self.zfs.destroy_snapshots(moves, defer=True)

    # -- the data channel (source side) -------------------------------------------------------

    def serve_stream(self, conn: socket.socket) -> None:
        """One target's connection: check its token, then `zfs send` straight into the socket."""
        conn.settimeout(30)
        try:
            line = _read_line(conn)
            if not line.startswith(_HELLO):
                raise precondition("not a zvolt move stream request")
            grant = self.grants.take(line.removeprefix(_HELLO).decode(errors="replace"))
        except (ZvoltError, OSError) as exc:
            with contextlib.suppress(OSError):
                conn.sendall(b"ERR " + str(exc).encode()[:300] + b"\n")
            return
        conn.sendall(b"OK\n")
        _keepalive(conn)
        conn.settimeout(None)
        start = time.monotonic()
        fields = {"volume": grant.volume_id, "target": grant.target, "snapshot": grant.snapshot.partition("@")[2],
                  "base": grant.base.partition("@")[2]}
        _log.info("move stream started", extra={"fields": fields})
        try:
            if isinstance(conn, ssl.SSLSocket):
                self._send_copied(grant, conn)
            else:
                self.streams.send(grant.snapshot, grant.base, conn.fileno())
        except (ZfsError, OSError) as exc:
            _log.error("move stream failed", extra={"fields": {**fields, "error": str(exc)}})
            return
        _log.info("move stream sent", extra={"fields": {**fields, "seconds": round(time.monotonic() - start, 3)}})

    def _send_copied(self, grant: Grant, conn: ssl.SSLSocket) -> None:
        """Under TLS the bytes pass through Python: `zfs send` into a pipe, the pipe into TLS."""
        read_fd, write_fd = os.pipe()

        def write_all(data: memoryview) -> None:
            conn.sendall(data)

        reader = _PipeToSocket(read_fd, write_all)
        thread = threading.Thread(target=reader.run, name="move-send", daemon=True)
        thread.start()
        try:
            self.streams.send(grant.snapshot, grant.base, write_fd)
        finally:
            os.close(write_fd)
            thread.join()
        if reader.error:
            raise OSError(reader.error)


def tls_contexts(cert: str, key: str, ca: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(serving, dialing): the move port serves with the agent's serving certificate; a target
    checks it against the CA and needs no client certificate (agents hold none)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=ca)
    # Agents' serving certificates name the agent, not its storage-network address: the chain
    # (this deployment's CA) is what is checked, and the one-time token what is authorised.
    client.check_hostname = False
    return server, client


class SendServer:
    """The source's move port: a TCP listener on the storage network, one thread per stream."""

    def __init__(self, moves: Moves, listen: str) -> None:
        self.moves = moves
        self.listen = listen
        self._sock: socket.socket | None = None
        self._stop = threading.Event()

    def start(self) -> int:
        """Bind, tell `moves` the address targets dial, serve in the background. Returns the port."""
        host, port = _split_address(self.listen)
        self._sock = socket.create_server((host, port))
        bound = int(self._sock.getsockname()[1])
        self.moves.address = f"{host}:{bound}"
        threading.Thread(target=self._loop, args=(self._sock,), name="move-listen", daemon=True).start()
        return bound

    def _loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if self.moves.tls_server is not None:
                try:
                    conn = self.moves.tls_server.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    conn.close()
                    continue
            threading.Thread(target=self._one, args=(conn,), name="move-send", daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            self.moves.serve_stream(conn)

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()


def _broken(host: str, port: int, ds: str, why: str) -> ZvoltError:
    return unavailable(f"the stream from {host}:{port} into {ds} broke ({why}); the source still holds the "
                       "volume: run the move again")


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = (address or "").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise precondition(f"move address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _keepalive(sock: socket.socket) -> None:
    # A peer that dies without a FIN (kill -9 of its machine, a cut link) must end the stream.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 60_000)
        # Idle 30 s, then 3 probes 10 s apart: a silent peer is given up on after about a minute.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def _read_line(sock: socket.socket, limit: int = 512) -> bytes:
    """One short line, byte by byte: nothing of the stream after it may be read here."""
    out = bytearray()
    while len(out) < limit:
        b = sock.recv(1)
        if not b or b == b"\n":
            return bytes(out)
        out += b
    raise precondition("move handshake line too long")


def _spliced(sock_fd: int, pipe_fd: int) -> Callable[[memoryview], int]:
    """A `recv_into` that moves the bytes socket -> pipe inside the kernel (splice) and returns
    how many; the buffer is never touched. Marked so that _Pump does not write them again."""

    def move(_: memoryview) -> int:
        return -os.splice(sock_fd, pipe_fd, _BUF) or 0

    return move


class _Pump:
    """Socket -> pipe (into `zfs receive`), a progress line every few seconds. Plain TCP: spliced
    in the kernel (`recv` returns minus the count: already written); TLS: 1 MiB reads and writes.
    With a rate, the pump sleeps whenever it is ahead of it: the socket's window fills and TCP
    slows the sender, so `zfs send` on the source waits too (no buffering grows anywhere)."""

    def __init__(self, recv_into: Callable[[memoryview], int], write_fd: int, what: str, rate: int = 0) -> None:
        self.recv_into = recv_into
        self.write_fd = write_fd
        self.what = what
        self.rate = max(0, rate)
        self.total = 0
        self.error = ""
        self.sink_closed = False  # the error was `zfs receive` going away, not the network

    def run(self) -> None:
        buf = memoryview(bytearray(_BUF))
        start = last = time.monotonic()
        try:
            while True:
                n = self.recv_into(buf)
                if n == 0:
                    break
                if n < 0:
                    n = -n  # spliced: in the pipe already
                else:
                    view = buf[:n]
                    while view:
                        view = view[os.write(self.write_fd, view):]
                self.total += n
                now = time.monotonic()
                if self.rate and (ahead := self.total / self.rate - (now - start)) > 0:
                    time.sleep(ahead)
                    now = time.monotonic()
                if now - last >= PROGRESS_EVERY:
                    last = now
                    _log.info("move stream progress", extra={"fields": {
                        "what": self.what, "bytes": self.total,
                        "mib_per_s": round(self.total / (1 << 20) / max(now - start, 1e-6), 1)}})
        except OSError as exc:
            self.error = str(exc) or type(exc).__name__
            self.sink_closed = isinstance(exc, BrokenPipeError)
        finally:
            os.close(self.write_fd)
        seconds = time.monotonic() - start
        _log.info("move stream received", extra={"fields": {
            "what": self.what, "bytes": self.total, "seconds": round(seconds, 3),
            "mib_per_s": round(self.total / (1 << 20) / max(seconds, 1e-6), 1)}})


class _PipeToSocket:
    def __init__(self, read_fd: int, write: Callable[[memoryview], None]) -> None:
        self.read_fd = read_fd
        self.write = write
        self.error = ""

    def run(self) -> None:
        buf = bytearray(_BUF)
        try:
            while True:
                n = os.readv(self.read_fd, [buf])
                if n == 0:
                    return
                self.write(memoryview(buf)[:n])
        except OSError as exc:
            self.error = str(exc)
        finally:
            os.close(self.read_fd)
