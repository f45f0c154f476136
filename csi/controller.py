"""CSI Controller service: validates per the spec, places volumes, and calls agents.

The controller never touches a disk. Ids: volume_id "<storage-node>/<id>", snapshot_id
"<storage-node>/<id>@<snap>", node_id = the node's host NQN (see csi/README.md). The node in an
id is the volume's home for ever; every call on an id goes to the node holding it now
(csi/locator.py), and ids built from agent answers name the home the agent reports.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from csi import TOPOLOGY_ZONE_KEY, dhchap, params, placement, publishing, volcaps
from csi.agents import AgentClient, AgentPool, fan_out
from csi.capacityview import CapacityView
from csi.locator import Locator
from csi.locks import KeyLocks
from csi.placements import GroupRecords, PlacementRecords
from zvolt.errors import (
    ZvoltError,
    aborted,
    already_exists,
    invalid,
    not_found,
    out_of_range,
    precondition,
    unavailable,
)
from zvolt.names import (
    check_csi_name,
    check_dhchap_secret_name,
    check_nqn,
    id_for_name,
    node_of_host_nqn,
    split_snapshot_id,
    split_volume_id,
)
from zvolt.pb import agent_pb2, csi_pb2, csi_pb2_grpc
from zvolt.volprops import round_up

_log = logging.getLogger("zvolt.csi.controller")

GiB = 1024**3
DEFAULT_SIZE = 1 * GiB
# A clone keeps its origin's volblocksize, which we may not know (the origin can be gone);
# 128 KiB is a multiple of every legal volblocksize.
CLONE_ALIGN = 128 * 1024
# Sizes travel as int64 to the agent; a range near that limit rounds up past it.
INT64_MAX = 2**63 - 1
STORAGE_NODE_CONTEXT = "zvolt.io/storage-node"
# Entries per list page when the CO sets no max_entries (~200 bytes each: far below 4 MiB).
DEFAULT_PAGE = 1000
# Per-agent deadline of the calls that ask every agent at once (name lookup without a record, capacity).
LOOKUP_TIMEOUT = 10.0
# How long placement reuses the storage nodes' capacity figures (csi/capacityview.py), and the
# deadline a node that did not answer the last time gets.
CAPACITY_TTL = 5.0
SILENT_RETRY_TIMEOUT = 2.0

RPC = csi_pb2.ControllerServiceCapability.RPC
STABLE_CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.PUBLISH_UNPUBLISH_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.LIST_VOLUMES_PUBLISHED_NODES,
    RPC.GET_CAPACITY,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.CLONE_VOLUME,
    RPC.EXPAND_VOLUME,
    RPC.GET_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
    RPC.MODIFY_VOLUME,
)
# Alpha in CSI 1.12: advertised only when asked for (--alpha-capabilities). Sidecars built
# for an older spec may not know them: external-provisioner v5.2.0 crashes at start in its
# log sanitizer on GET_SNAPSHOT.
ALPHA_CAPABILITIES = {"GET_SNAPSHOT": RPC.GET_SNAPSHOT}


def alpha_capabilities(spec: str) -> tuple[RPC.Type, ...]:
    """`GET_SNAPSHOT,...` -> capability numbers; unknown names are refused."""
    chosen = []
    for name in filter(None, (part.strip() for part in spec.split(","))):
        if name not in ALPHA_CAPABILITIES:
            raise invalid(f"unknown alpha capability {name!r} (known: {', '.join(sorted(ALPHA_CAPABILITIES))})")
        chosen.append(ALPHA_CAPABILITIES[name])
    return tuple(chosen)


def choose_size(rng: csi_pb2.CapacityRange | None, align: int, minimum: int = 0) -> int:
    """Bytes to create for a capacity range; OUT_OF_RANGE when the range cannot be met."""
    required = rng.required_bytes if rng is not None else 0
    limit = rng.limit_bytes if rng is not None else 0
    if required < 0 or limit < 0:
        raise invalid("capacity_range values must not be negative")
    if limit and required > limit:
        raise out_of_range(f"required_bytes {required} is larger than limit_bytes {limit}")
    if minimum and limit and limit < minimum:
        raise out_of_range(f"limit_bytes {limit} is smaller than the source's size {minimum}")
    want = max(required, minimum) or (min(DEFAULT_SIZE, limit) if limit else DEFAULT_SIZE)
    size = round_up(want, align)
    if size > INT64_MAX:
        raise out_of_range(f"required_bytes {required} rounded up to the {align}-byte block size exceeds int64")
    if limit and size > limit:
        raise out_of_range(f"no size between {required} and {limit} bytes is a multiple of the {align}-byte block size")
    return size


@dataclass(frozen=True)
class PageToken:
    node: str
    token: str

    def encode(self) -> str:
        raw = json.dumps({"n": self.node, "t": self.token}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(value: str) -> PageToken:
        try:
            data = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
            if not isinstance(data, dict) or not isinstance(data.get("n"), str) or not isinstance(data.get("t"), str):
                raise ValueError("bad token shape")
            return PageToken(node=data["n"], token=data["t"])
        except (ValueError, binascii.Error, UnicodeDecodeError) as err:
            # The spec names ABORTED for an invalid starting_token: the CO restarts the listing.
            raise aborted(f"starting_token {value[:64]!r} is not valid; restart the listing") from err


def paginate(
    agents: list[AgentClient],
    max_entries: int,
    starting_token: str,
    fetch: Callable[[AgentClient, int, str], tuple[list[Any], str]],
) -> tuple[list[Any], str]:
    """Pages across agents (sorted by name): the opaque token is (agent, that agent's token).

    max_entries=0 (external-attacher's default) still pages: a whole cluster in one message
    would pass gRPC's 4 MiB limit at tens of thousands of volumes."""
    if max_entries < 0:
        raise invalid("max_entries must not be negative")
    max_entries = max_entries or DEFAULT_PAGE
    index, token = 0, ""
    if starting_token:
        start = PageToken.decode(starting_token)
        index = next((i for i, a in enumerate(agents) if a.name >= start.node), len(agents))
        if index < len(agents) and agents[index].name == start.node:
            token = start.token
    items: list[Any] = []
    while index < len(agents):
        want = max_entries - len(items)
        page, next_token = fetch(agents[index], want, token)
        items.extend(page)
        if next_token:
            if len(items) >= max_entries:
                return items, PageToken(agents[index].name, next_token).encode()
            token = next_token
            continue
        index, token = index + 1, ""
        if len(items) >= max_entries:
            return items, PageToken(agents[index].name, "").encode() if index < len(agents) else ""
    return items, ""


def same_node(a: str, b: str) -> bool:
    """Two host NQNs made by zvolt for the same Kubernetes node."""
    node = node_of_host_nqn(a)
    return node is not None and node == node_of_host_nqn(b)


def _timestamp(unix: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=unix)


class ControllerService(csi_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    def __init__(self, pool: AgentPool, locks: KeyLocks | None = None, alpha: tuple[RPC.Type, ...] = (),
                 records: PlacementRecords | None = None, locator: Locator | None = None,
                 keys: dhchap.VolumeKeys | None = None) -> None:
        self.pool = pool
        self.keys = keys  # DH-HMAC-CHAP: each authenticated volume's Secret (--dhchap-secret-namespace)
        self.locator = locator or Locator(pool, fan_out, LOOKUP_TIMEOUT)
        self.locks = locks or KeyLocks()
        self.capabilities = (*STABLE_CAPABILITIES, *alpha)
        self.records = records
        self.capacity = CapacityView(CAPACITY_TTL)

    # ------------------------------------------------------------ conversions

    def _volume(self, agent: AgentClient, vol: agent_pb2.Volume) -> csi_pb2.Volume:
        out = csi_pb2.Volume(
            capacity_bytes=vol.size_bytes,
            volume_id=f"{vol.home_node or agent.name}/{vol.id}",
            volume_context={STORAGE_NODE_CONTEXT: agent.name},
            accessible_topology=[csi_pb2.Topology(segments={TOPOLOGY_ZONE_KEY: agent.zone})],
        )
        source_home = vol.source_home_node or agent.name
        if vol.source_snapshot_id:
            out.content_source.snapshot.snapshot_id = f"{source_home}/{vol.source_snapshot_id}"
        elif vol.source_volume_id:
            out.content_source.volume.volume_id = f"{source_home}/{vol.source_volume_id}"
        return out

    @staticmethod
    def _snapshot(agent: AgentClient, snap: agent_pb2.Snapshot) -> csi_pb2.Snapshot:
        home = snap.home_node or agent.name
        return csi_pb2.Snapshot(
            size_bytes=snap.size_bytes,
            snapshot_id=f"{home}/{snap.id}",
            source_volume_id=f"{home}/{snap.source_volume_id}",
            creation_time=_timestamp(snap.created_unix),
            ready_to_use=snap.ready_to_use,
        )

    # --------------------------------------------------------------- lookups

    def _agent_for(self, node: str) -> AgentClient:
        """For placing a new volume only: a call on an existing id goes through the locator."""
        return self.pool.get(node)

    def _held(self, node: str, local: str) -> tuple[AgentClient, agent_pb2.Volume]:
        """(the agent holding volume `node`/`local` now, its agent Volume)."""
        agent, vol = self.locator.get_volume(node, local)
        return agent, vol

    def _call(self, node: str, local: str, method: str, request: Any) -> Any:
        """`method` on the agent holding volume `node`/`local` now (snapshot calls: their volume's)."""
        return self.locator.call(node, local, method, request)[1]

    def _find_by_name(self, name: str) -> tuple[tuple[AgentClient, agent_pb2.Volume] | None, dict[str, str]]:
        """Idempotency across nodes: the id is derived from the name, so ask every agent, all at
        once. Returns (where it is, if found; the agents that could not answer: node -> why).
        Only a held copy counts: the node a volume left (tombstone) and a target still receiving
        it answer too, with a placement that says so."""
        local_id = id_for_name(name)
        agents = self.pool.all()
        silent: dict[str, str] = {}
        req = agent_pb2.GetVolumeRequest(volume_id=local_id)
        answers = fan_out(agents, lambda a: a.call("GetVolume", req, timeout=LOOKUP_TIMEOUT))
        for agent, found in zip(agents, answers, strict=True):
            if isinstance(found, ZvoltError):
                if found.code != grpc.StatusCode.NOT_FOUND:
                    silent[agent.name] = found.message
                continue
            if found.placement not in (agent_pb2.PLACEMENT_MOVED, agent_pb2.PLACEMENT_INCOMING):
                return (agent, self._same_name(agent, found.volume, name)), silent
        return None, silent

    def _lookup(self, name: str, pvc: tuple[str, str] | None
                ) -> tuple[tuple[AgentClient, agent_pb2.Volume] | None, dict[str, str]]:
        """_find_by_name, asking only the nodes that can hold the volume. The PVC's placement
        record is written before every agent CreateVolume call, so it names the one node an
        earlier attempt may have reached, and no record means no attempt was ever sent: a create
        then costs one agent call or none, not one per storage node, and a silent node it does
        not name costs it nothing. Without records (static discovery, no PVC) every agent is asked."""
        record = self.records.get(*pvc) if self.records is not None and pvc is not None else None
        if self.records is None or pvc is None or (record is not None and record[0] != name):
            return self._find_by_name(name)
        if record is None:
            return None, {}
        try:
            agent, found = self.locator.get_volume(record[1], id_for_name(name), LOOKUP_TIMEOUT)
        except ZvoltError as err:
            return None, ({} if err.code == grpc.StatusCode.NOT_FOUND else {record[1]: err.message})
        return (agent, self._same_name(agent, found, name)), {}

    @staticmethod
    def _same_name(agent: AgentClient, found: agent_pb2.Volume, name: str) -> agent_pb2.Volume:
        if found.name and found.name != name:
            raise already_exists(f"volume id {found.id} on {agent.name} belongs to another name {found.name!r}")
        return found

    def _check_silent(self, name: str, pvc: tuple[str, str] | None, silent: dict[str, str]) -> None:
        """Some storage nodes did not answer the lookup. Creating elsewhere is safe only if no
        earlier attempt went to one of them, which the PVC's placement record tells
        (csi/placements.py); without a record, answer UNAVAILABLE (the CO retries)."""
        if self.records is None or pvc is None:
            raise unavailable(f"cannot tell whether volume {name!r} exists yet: {'; '.join(silent.values())}; "
                              "retry later")
        record = self.records.get(*pvc)
        if record is not None and record[0] == name and record[1] in silent:
            raise unavailable(f"an earlier attempt to create volume {name!r} went to storage node {record[1]}, "
                              f"which does not answer ({silent[record[1]]}); retry later")

    def _record(self, name: str, pvc: tuple[str, str] | None, node: str) -> None:
        if self.records is not None and pvc is not None:
            self.records.put(*pvc, name, node)

    def warm(self) -> None:
        """At start: placement's first view of the nodes' capacity, taken in the background."""
        self.capacity.prime(self._ask_capacity)

    def _candidates(self) -> list[placement.Candidate]:
        return self._ask_capacity(frozenset())[0]

    def _ask_capacity(self, silent_before: frozenset[str]) -> tuple[list[placement.Candidate], frozenset[str]]:
        """Every agent's GetCapacity at once; a node silent last time gets the short deadline."""
        found, silent = [], set()
        agents = self.pool.all()
        request = agent_pb2.GetCapacityRequest()
        answers = fan_out(agents, lambda a: a.call(
            "GetCapacity", request, timeout=SILENT_RETRY_TIMEOUT if a.name in silent_before else LOOKUP_TIMEOUT))
        for agent, cap in zip(agents, answers, strict=True):
            if isinstance(cap, ZvoltError):
                _log.warning(
                    "storage node left out of placement", extra={"fields": {"node": agent.name, "error": cap.message}}
                )
                silent.add(agent.name)
                continue
            found.append(self._candidate(agent, cap))
        return found, frozenset(silent)

    def _place(self, size: int, par: params.VolumeParams, request: csi_pb2.CreateVolumeRequest,
               pvc: tuple[str, str] | None) -> list[str]:
        """Nodes to try for a new volume, from the shared capacity view (csi/capacityview.py); a
        refusal on figures up to CAPACITY_TTL old is checked again on fresh ones."""
        zones = self._zones(request)
        group = self._group_spread(par, pvc)
        for attempt in (1, 2):
            known = {a.name for a in self.pool.all()}
            view = [c for c in self.capacity.get(self._ask_capacity) if c.name in known]
            try:
                return placement.choose(view, size, par.thick, zones, par.commitment_ratio, group)
            except ZvoltError:
                if attempt == 2:
                    raise
                self.capacity.expire()
        raise AssertionError("unreachable")

    def _group_spread(self, par: params.VolumeParams, pvc: tuple[str, str] | None) -> placement.GroupSpread | None:
        """Where the other volumes of this volume's group live: the placement records of the PVCs
        labelled with the group (csi/placements.py), read for this group only."""
        group = par.group()
        if group is None or pvc is None:
            return None
        if not isinstance(self.records, GroupRecords):
            if par.group_spread == "required":
                raise precondition(f"{params.GROUP_SPREAD_KEY}=required needs placement records on PVCs: run the "
                                   "controller with --agents-from-kubernetes")
            return None
        members = self.records.members(*group)
        members.pop(pvc[1], None)  # a retry's own earlier record is not another member
        return placement.GroupSpread(group="/".join(group), required=par.group_spread == "required",
                                     members=Counter(members.values()))

    @staticmethod
    def _candidate(agent: AgentClient, cap: agent_pb2.GetCapacityResponse) -> placement.Candidate:
        return placement.from_capacity(agent.name, agent.zone, cap)

    def _check_class_commitment(self, agent: AgentClient, size: int, class_ratio: float) -> None:
        """A clone or restore lands on its source's node: the class's limit is checked there
        (the node's own limit is the agent's to enforce)."""
        cand = self._candidate(agent, agent.call("GetCapacity", agent_pb2.GetCapacityRequest(),
                                                 timeout=LOOKUP_TIMEOUT))
        room = placement.admits(cand, class_ratio)
        if room is not None and size > room:
            raise ZvoltError(grpc.StatusCode.RESOURCE_EXHAUSTED, placement.refusal(cand, size, class_ratio))

    # ------------------------------------------------------------- volumes

    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext) -> Any:
        name = check_csi_name(request.name, "name")
        if not request.volume_capabilities:
            raise invalid("volume_capabilities is required")
        volcaps.require(request.volume_capabilities)
        par = params.parse_create(request.parameters, request.mutable_parameters)
        rng = request.capacity_range if request.HasField("capacity_range") else None
        source_node, source = self._source_ids(request)
        pvc = (par.labels["pvc-namespace"], par.labels["pvc-name"]) \
            if "pvc-namespace" in par.labels and "pvc-name" in par.labels else None
        group = par.group()
        if par.dhchap or par.tls:
            if self.keys is None:
                asked = f"{params.DHCHAP_KEY}={par.dhchap}" if par.dhchap else f"{params.TLS_KEY}=psk"
                raise precondition(f"the StorageClass asks for {asked}, but this controller keeps no volume keys: "
                                   "start it with --dhchap-secret-namespace (the chart does)")
            check_dhchap_secret_name(name)
        # One create per group at a time: each sees the records of those before it (ABORTED: the CO retries).
        with self.locks.hold(f"name:{name}", *([f"group:{'/'.join(group)}"] if group else [])):
            # By name first: a retry must find the volume it made even if its source is gone since.
            existing, silent = self._lookup(name, pvc)
            if existing is not None:
                return self._created(self._check_same(existing, rng, par, source), name, par)
            if silent:
                self._check_silent(name, pvc, silent)
            source_agent, minimum = self._resolve_source(source_node, source)
            align = CLONE_ALIGN if source_agent is not None else par.volblocksize
            size = choose_size(rng, align, minimum)
            base = agent_pb2.CreateVolumeRequest(
                name=name,
                size_bytes=size,
                volblocksize=par.volblocksize,
                compression=par.compression,
                thick=par.thick,
                labels=par.labels,
                source_snapshot_id=source.get("source_snapshot_id", ""),
                source_volume_id=source.get("source_volume_id", ""),
                encryption_key=params.encryption_key(request.secrets, "provisioner") if par.encrypted else b"",
            )
            if source_agent is not None:
                order = [source_agent.name]
                if request.HasField("accessibility_requirements"):
                    self._check_topology(request.accessibility_requirements, source_agent)
                if par.commitment_ratio:
                    self._check_class_commitment(source_agent, size, par.commitment_ratio)
            else:
                order = self._place(size, par, request, pvc)
            last: ZvoltError | None = None
            for node in order:
                agent = self._agent_for(node)
                self._record(name, pvc, node)
                try:
                    vol = agent.call("CreateVolume", base).volume
                except ZvoltError as err:
                    if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and source_agent is None:
                        self.capacity.expire()
                        last = err
                        continue
                    raise
                if source_agent is None:
                    self.capacity.placed(node, vol.size_bytes, par.thick)
                return self._created(self._volume(agent, vol), name, par)
            assert last is not None
            raise last

    def _created(self, vol: csi_pb2.Volume, name: str, par: params.VolumeParams) -> csi_pb2.CreateVolumeResponse:
        """After the volume exists: its key Secret (a retry finds both and makes neither)."""
        if (par.dhchap or par.tls) and self.keys is not None:
            self.keys.ensure(name, par.dhchap, par.tls)
            if par.dhchap:
                vol.volume_context[dhchap.CONTEXT_KEY] = par.dhchap
            if par.tls:
                vol.volume_context[dhchap.TLS_CONTEXT_KEY] = "psk"
        return csi_pb2.CreateVolumeResponse(volume=vol)

    @staticmethod
    def _zones(request: csi_pb2.CreateVolumeRequest) -> placement.ZoneRequirement:
        req = request.accessibility_requirements
        return placement.zone_requirement(
            [dict(t.segments) for t in req.requisite], [dict(t.segments) for t in req.preferred]
        )

    def _check_topology(self, req: csi_pb2.TopologyRequirement, agent: AgentClient) -> None:
        zones = placement.zone_requirement([dict(t.segments) for t in req.requisite], [])
        if zones.requisite is not None and agent.zone not in zones.requisite:
            raise ZvoltError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the source lives on {agent.name} in zone {agent.zone}, outside the requested topology",
            )

    @staticmethod
    def _source_ids(request: csi_pb2.CreateVolumeRequest) -> tuple[str, dict[str, str]]:
        """The content source as (storage node, agent-local ids); a malformed id cannot exist."""
        if not request.HasField("volume_content_source"):
            return "", {}
        src = request.volume_content_source
        kind = src.WhichOneof("type")
        if kind == "snapshot":
            snapshot_id = src.snapshot.snapshot_id
            if not snapshot_id:
                raise invalid("volume_content_source.snapshot.snapshot_id is required")
            try:
                node, vol_id, snap = split_snapshot_id(snapshot_id)
            except ZvoltError:
                raise not_found(f"source snapshot {snapshot_id!r} does not exist") from None
            return node, {"source_snapshot_id": f"{vol_id}@{snap}"}
        if kind == "volume":
            volume_id = src.volume.volume_id
            if not volume_id:
                raise invalid("volume_content_source.volume.volume_id is required")
            try:
                node, vol_id = split_volume_id(volume_id)
            except ZvoltError:
                raise not_found(f"source volume {volume_id!r} does not exist") from None
            return node, {"source_volume_id": vol_id}
        raise invalid("volume_content_source needs a snapshot or a volume")

    def _resolve_source(self, node: str, source: dict[str, str]) -> tuple[AgentClient | None, int]:
        """The agent holding the source and the source's size (the clone's minimum)."""
        if not source:
            return None, 0
        # A node not discovered yet: UNAVAILABLE (retried), not NOT_FOUND (csi/locator.py).
        if "source_snapshot_id" in source:
            local = source["source_snapshot_id"]
            agent, resp = self.locator.call(node, local.partition("@")[0], "ListSnapshots",
                                            agent_pb2.ListSnapshotsRequest(snapshot_id=local))
            if not resp.snapshots:
                raise not_found(f"source snapshot {node}/{local} does not exist")
            return agent, resp.snapshots[0].size_bytes
        agent, vol = self._held(node, source["source_volume_id"])
        return agent, vol.size_bytes

    def _check_same(
        self,
        existing: tuple[AgentClient, agent_pb2.Volume],
        rng: csi_pb2.CapacityRange | None,
        par: params.VolumeParams,
        source: dict[str, str],
    ) -> csi_pb2.Volume:
        agent, vol = existing
        required = rng.required_bytes if rng else 0
        limit = rng.limit_bytes if rng else 0
        problems = []
        if vol.size_bytes < required or (limit and vol.size_bytes > limit):
            problems.append(f"size {vol.size_bytes} is outside the requested range")
        if (vol.source_snapshot_id, vol.source_volume_id) != (
            source.get("source_snapshot_id", ""),
            source.get("source_volume_id", ""),
        ):
            problems.append("it was created from a different source")
        if not source:
            if vol.volblocksize and vol.volblocksize != par.volblocksize:
                problems.append(f"volblocksize is {vol.volblocksize}")
            if vol.compression and vol.compression != par.compression:
                problems.append(f"compression is {vol.compression}")
            if vol.thick != par.thick:
                problems.append("thin/thick differs")
        if problems:
            raise already_exists(f"a volume named {vol.name!r} already exists but " + "; ".join(problems))
        return self._volume(agent, vol)

    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        try:
            node, local = split_volume_id(request.volume_id)
        except ZvoltError:
            return csi_pb2.DeleteVolumeResponse()  # could never have existed: already deleted
        with self.locks.hold(f"vol:{request.volume_id}"):
            try:
                if self.keys is not None:
                    # Its Secret first (named after the volume's name, which the agent keeps):
                    # a retry after the volume is gone could no longer name it.
                    self.keys.delete(self._held(node, local)[1].name)
                self._call(node, local, "DeleteVolume", agent_pb2.DeleteVolumeRequest(volume_id=local))
            except ZvoltError as err:
                if err.code != grpc.StatusCode.NOT_FOUND:
                    raise
        return csi_pb2.DeleteVolumeResponse()

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        if not request.node_id:
            raise invalid("node_id is required")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        volcaps.require([request.volume_capability], "volume_capability")
        try:
            node, local = split_volume_id(request.volume_id)
        except ZvoltError:
            raise not_found(f"volume {request.volume_id!r} does not exist") from None
        try:
            host = check_nqn(request.node_id)
        except ZvoltError:
            raise not_found(f"node {request.node_id!r} does not exist (zvolt node ids are host NQNs)") from None
        with self.locks.hold(f"vol:{request.volume_id}"):
            agent, vol = self._held(node, local)
            # An older identity of this same node (reimaged, state wiped) is dead: revoke it
            # rather than refuse the node for ever as "published elsewhere".
            stale = [h for h in vol.published_hosts if h != host and same_node(h, host)]
            for old in stale:
                agent.call("UnpublishVolume", agent_pb2.UnpublishVolumeRequest(volume_id=local, host_nqn=old))
            others = [h for h in vol.published_hosts if h != host and h not in stale]
            if others and request.volume_capability.access_mode.mode in volcaps.SINGLE_NODE:
                raise ZvoltError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {request.volume_id} is published to node {others[0]}; its access mode allows one node",
                )
            key = params.optional_encryption_key(request.secrets, "controller-publish")
            pub = publishing.agent_request(self.keys, request.volume_id, vol.name, local, host,
                                           request.volume_context, encryption_key=key)
            resp = agent.call("PublishVolume", pub)
        ctx = publishing.node_context(resp, request.volume_context)
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=ctx)

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        done = csi_pb2.ControllerUnpublishVolumeResponse()
        try:
            node, local = split_volume_id(request.volume_id)
        except ZvoltError:
            return done  # cannot exist, so it is not published anywhere
        target = ""
        if request.node_id:
            try:
                target = check_nqn(request.node_id)
            except ZvoltError:
                return done  # never a valid node: nothing was published to it
        with self.locks.hold(f"vol:{request.volume_id}"):
            try:
                agent, vol = self._held(node, local)
                published = vol.published_hosts
                # Whatever NQN the node reports now, what was published to that node goes.
                hosts = [h for h in published if not target or h == target or same_node(h, target)]
                for host in hosts:
                    agent.call("UnpublishVolume", agent_pb2.UnpublishVolumeRequest(volume_id=local, host_nqn=host))
            except ZvoltError as err:
                if err.code != grpc.StatusCode.NOT_FOUND:
                    raise
        return done

    def unpublish_if(self, volume_id: str, host: str, still_stale: Callable[[], bool]) -> bool:
        """Unpublish one host if `still_stale()` says so when checked under the volume lock, the
        lock every ControllerPublish of this volume takes (csi/attachments.py). True if done."""
        node, local = split_volume_id(volume_id)
        with self.locks.hold(f"vol:{volume_id}"):
            if not still_stale():
                return False
            self._call(node, local, "UnpublishVolume", agent_pb2.UnpublishVolumeRequest(volume_id=local, host_nqn=host))
        return True

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        if not request.volume_capabilities:
            raise invalid("volume_capabilities is required")
        for cap in request.volume_capabilities:
            volcaps.check_structure(cap)
        try:
            node, local = split_volume_id(request.volume_id)
        except ZvoltError:
            raise not_found(f"volume {request.volume_id!r} does not exist") from None
        self._held(node, local)
        reasons = [r for r in (volcaps.unsupported(c) for c in request.volume_capabilities) if r]
        try:
            params.parse_create(request.parameters, request.mutable_parameters)
        except ZvoltError as err:
            reasons.append(err.message)
        if reasons:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(reasons))
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
            mutable_parameters=request.mutable_parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def ListVolumes(self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext) -> Any:
        def fetch(agent: AgentClient, want: int, token: str) -> tuple[list[Any], str]:
            resp = agent.call("ListVolumes", agent_pb2.ListVolumesRequest(max_entries=want, starting_token=token))
            entries = [
                csi_pb2.ListVolumesResponse.Entry(
                    volume=self._volume(agent, v),
                    status=csi_pb2.ListVolumesResponse.VolumeStatus(published_node_ids=list(v.published_hosts)),
                )
                for v in resp.volumes
            ]
            return entries, resp.next_token

        entries, next_token = paginate(self.pool.all(), request.max_entries, request.starting_token, fetch)
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        try:
            node, local = split_volume_id(request.volume_id)
        except ZvoltError:
            raise not_found(f"volume {request.volume_id!r} does not exist") from None
        agent, vol = self._held(node, local)
        abnormal = vol.condition == agent_pb2.VOLUME_CONDITION_ABNORMAL
        condition = csi_pb2.VolumeCondition(
            abnormal=abnormal, message=vol.condition_message or ("abnormal" if abnormal else "healthy")
        )
        status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=list(vol.published_hosts), volume_condition=condition
        )
        return csi_pb2.ControllerGetVolumeResponse(volume=self._volume(agent, vol), status=status)

    def GetCapacity(self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext) -> Any:
        for cap in request.volume_capabilities:
            volcaps.check_structure(cap)
        thick, class_ratio = False, 0.0
        try:
            par = params.parse(request.parameters)
            thick, class_ratio = par.thick, par.commitment_ratio
        except ZvoltError as err:
            # Failing here would publish no CSIStorageCapacity and the user would only read the
            # scheduler's "not enough free storage"; answering (as for a thin class) lets
            # CreateVolume refuse with the real reason, which lands on the PVC as an event.
            _log.warning("GetCapacity for an unusable StorageClass", extra={"fields": {"error": err.message}})
        if any(volcaps.unsupported(c) for c in request.volume_capabilities):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        zone = (
            request.accessible_topology.segments.get(TOPOLOGY_ZONE_KEY)
            if request.HasField("accessible_topology")
            else None
        )
        total, biggest = 0, 0
        for cand in self._candidates():
            if zone is not None and cand.zone != zone:
                continue
            total += placement.admissible(cand, thick, class_ratio)
            biggest = max(biggest, placement.largest_volume(cand, thick, class_ratio))
        resp = csi_pb2.GetCapacityResponse(available_capacity=total)
        resp.maximum_volume_size.value = biggest
        return resp

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> Any:
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.ControllerServiceCapability(rpc=RPC(type=t)) for t in self.capabilities]
        )

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        if not request.HasField("capacity_range"):
            raise invalid("capacity_range is required")
        if request.HasField("volume_capability"):
            volcaps.check_structure(request.volume_capability)
        try:
            node, local = split_volume_id(request.volume_id)
        except ZvoltError:
            raise not_found(f"volume {request.volume_id!r} does not exist") from None
        block = request.HasField("volume_capability") and request.volume_capability.HasField("block")
        with self.locks.hold(f"vol:{request.volume_id}"):
            agent, vol = self._held(node, local)
            rng = request.capacity_range
            if rng.limit_bytes and vol.size_bytes > rng.limit_bytes:
                raise out_of_range(
                    f"volume is already {vol.size_bytes} bytes, above limit_bytes; shrinking is not supported"
                )
            if vol.size_bytes >= rng.required_bytes:
                size = vol.size_bytes
            else:
                size = choose_size(rng, vol.volblocksize or CLONE_ALIGN)
                key = params.optional_encryption_key(request.secrets, "controller-expand")
                size = agent.call(
                    "ExpandVolume", agent_pb2.ExpandVolumeRequest(volume_id=local, size_bytes=size, encryption_key=key)
                ).volume.size_bytes
        # Raw block needs no filesystem work; the agent revalidates the namespace size on the target.
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=size, node_expansion_required=not block)

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        changes = params.parse_mutable(request.mutable_parameters)
        try:
            node, local = split_volume_id(request.volume_id)
        except ZvoltError:
            raise not_found(f"volume {request.volume_id!r} does not exist") from None
        with self.locks.hold(f"vol:{request.volume_id}"):
            # The agent looks the volume up (NOT_FOUND) and sets only what differs, so an empty
            # class (nothing to change) still answers for a volume that does not exist.
            self._call(node, local, "ModifyVolume",
                       agent_pb2.ModifyVolumeRequest(volume_id=local, compression=changes.compression))
        return csi_pb2.ControllerModifyVolumeResponse()

    # ----------------------------------------------------------- snapshots

    def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext) -> Any:
        if not request.source_volume_id:
            raise invalid("source_volume_id is required")
        name = check_csi_name(request.name, "name")
        try:
            node, local = split_volume_id(request.source_volume_id)
        except ZvoltError:
            raise not_found(f"source volume {request.source_volume_id!r} does not exist") from None
        labels = params.parse_snapshot(request.parameters)
        with self.locks.hold(f"snap:{name}"):
            # A node not discovered yet: UNAVAILABLE (retried), not NOT_FOUND (csi/locator.py).
            agent, resp = self.locator.call(
                node, local, "CreateSnapshot",
                agent_pb2.CreateSnapshotRequest(name=name, source_volume_id=local, labels=labels))
            snap = resp.snapshot
        return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot(agent, snap))

    def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext) -> Any:
        if not request.snapshot_id:
            raise invalid("snapshot_id is required")
        try:
            node, vol, snap = split_snapshot_id(request.snapshot_id)
        except ZvoltError:
            return csi_pb2.DeleteSnapshotResponse()
        with self.locks.hold(f"snapid:{request.snapshot_id}"):
            try:
                self._call(node, vol, "DeleteSnapshot", agent_pb2.DeleteSnapshotRequest(snapshot_id=f"{vol}@{snap}"))
            except ZvoltError as err:
                if err.code != grpc.StatusCode.NOT_FOUND:
                    raise
        return csi_pb2.DeleteSnapshotResponse()

    def _snapshot_scope(self, request: csi_pb2.ListSnapshotsRequest
                        ) -> tuple[list[AgentClient], str, str, tuple[str, str] | None] | None:
        """Which agents to ask, with which local filters, and for a filtered listing the
        (home node, volume id) whose holder answers; None when nothing can match."""
        snap_filter, vol_filter, node, vid = "", "", None, ""
        try:
            if request.snapshot_id:
                node, vid, snap = split_snapshot_id(request.snapshot_id)
                snap_filter = f"{vid}@{snap}"
            if request.source_volume_id:
                vnode, vol_filter = split_volume_id(request.source_volume_id)
                if node is not None and (vnode, vol_filter) != (node, vid):
                    return None
                node, vid = vnode, vol_filter
        except ZvoltError:
            return None
        if node is None:
            return self.pool.all(), snap_filter, vol_filter, None
        try:
            agent = self.locator.holder(node, vid)
        except ZvoltError:
            return None  # neither its home nor any other node holds it
        return [agent], snap_filter, vol_filter, (node, vid)

    def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext) -> Any:
        scope = self._snapshot_scope(request)
        if scope is None:
            if request.starting_token:
                PageToken.decode(request.starting_token)
            return csi_pb2.ListSnapshotsResponse()
        agents, snap_filter, vol_filter, of = scope

        def fetch(agent: AgentClient, want: int, token: str) -> tuple[list[Any], str]:
            req = agent_pb2.ListSnapshotsRequest(
                max_entries=want, starting_token=token, snapshot_id=snap_filter, source_volume_id=vol_filter
            )
            if of is None:
                resp = agent.call("ListSnapshots", req)
            else:
                try:
                    agent, resp = self.locator.call(*of, "ListSnapshots", req)
                except ZvoltError as err:
                    if err.code != grpc.StatusCode.NOT_FOUND:
                        raise
                    return [], ""
            return [
                csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._snapshot(agent, s)) for s in resp.snapshots
            ], resp.next_token

        entries, next_token = paginate(agents, request.max_entries, request.starting_token, fetch)
        return csi_pb2.ListSnapshotsResponse(entries=entries, next_token=next_token)

    def GetSnapshot(self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext) -> Any:
        if not request.snapshot_id:
            raise invalid("snapshot_id is required")
        try:
            node, vol, snap = split_snapshot_id(request.snapshot_id)
        except ZvoltError:
            raise not_found(f"snapshot {request.snapshot_id!r} does not exist") from None
        agent, resp = self.locator.call(node, vol, "ListSnapshots",
                                        agent_pb2.ListSnapshotsRequest(snapshot_id=f"{vol}@{snap}"))
        found = resp.snapshots
        if not found:
            raise not_found(f"snapshot {request.snapshot_id!r} does not exist")
        return csi_pb2.GetSnapshotResponse(snapshot=self._snapshot(agent, found[0]))
