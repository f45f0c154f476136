"""Stale attachments: what no VolumeAttachment wants is found, confirmed twice, and cleared
under the volume lock; what Kubernetes still attaches is never touched."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from csi.agents import AgentPool, parse_static
from csi.attachments import KubeAttachments, Publish, Reconciler, find_stale, lease_identity, lease_name, wanted
from csi.controller import ControllerService
from csi.fakes import FakeAgent, serve_fake_agent
from zvolt.pb import agent_pb2

W1 = "nqn.2026-11.io.zvolt:host:worker-1:11111111-1111-1111-1111-111111111111"
W1_OLD = "nqn.2026-11.io.zvolt:host:worker-1:00000000-0000-0000-0000-000000000000"
W2 = "nqn.2026-11.io.zvolt:host:worker-2:22222222-2222-2222-2222-222222222222"
FOREIGN = "nqn.2014-08.org.nvmexpress:uuid:33333333-3333-3333-3333-333333333333"


def kube(attached: dict[str, set[str]], node_ids: dict[str, str]) -> KubeAttachments:
    return KubeAttachments({v: frozenset(n) for v, n in attached.items()}, node_ids)


def test_wanted_follows_volumeattachments_and_the_nodes_current_identity() -> None:
    k = kube({"s0/v1": {"worker-1"}}, {"worker-1": W1, "worker-2": W2})
    assert wanted(Publish("s0/v1", W1), k)
    assert not wanted(Publish("s0/v1", W1_OLD), k)  # the reimaged worker's old identity
    assert not wanted(Publish("s0/v1", W2), k)  # no VolumeAttachment on worker-2
    assert not wanted(Publish("s0/v2", W1), k)  # no VolumeAttachment at all
    # The node's CSINode is not there right now: its NQN-named publishes are kept, not guessed.
    unsure = kube({"s0/v1": {"worker-1"}}, {})
    assert wanted(Publish("s0/v1", W1_OLD), unsure) and wanted(Publish("s0/v1", FOREIGN), unsure)
    assert not wanted(Publish("s0/v1", W2), unsure)
    assert find_stale([Publish("s0/v2", W1), Publish("s0/v1", W1)], k) == [Publish("s0/v2", W1)]


def test_lease_names_match_csi_lib_utils() -> None:
    assert lease_name("csi.zvolt.io") == "external-attacher-leader-csi-zvolt-io"
    assert lease_identity("zvolt-controller-7d9f_x.") == "zvolt-controller-7d9f-x-X"


@pytest.fixture
def storage(sockdir: str) -> Iterator[tuple[FakeAgent, ControllerService]]:
    agent = FakeAgent("s0")
    server = serve_fake_agent(agent, f"{sockdir}/s0.sock")
    pool = AgentPool(lambda: parse_static(f"s0=unix://{sockdir}/s0.sock"), tls=None, timeout=5)
    for name in ("v-kept", "v-stale"):
        vid = agent.CreateVolume(agent_pb2.CreateVolumeRequest(name=name, size_bytes=1 << 30), None).volume.id
        agent.PublishVolume(agent_pb2.PublishVolumeRequest(volume_id=vid, host_nqn=W1), None)
    yield agent, ControllerService(pool)
    pool.close()
    server.stop(None)


def _ids(agent: FakeAgent) -> dict[str, str]:
    return {v.name: f"s0/{v.id}" for v in agent.state.volumes.values()}


def _hosts(agent: FakeAgent, name: str) -> list[str]:
    return next(list(v.published_hosts) for v in agent.state.volumes.values() if v.name == name)


def test_reconciler_clears_only_after_two_passes_and_only_when_leading(
        storage: tuple[FakeAgent, ControllerService]) -> None:
    agent, ctrl = storage
    ids = _ids(agent)
    k = kube({ids["v-kept"]: {"worker-1"}}, {"worker-1": W1})
    leader = [False]
    rec = Reconciler(ctrl.pool, lambda: k, lambda p, still: ctrl.unpublish_if(p.volume_id, p.host, still),
                     is_leader=lambda: leader[0])
    assert rec.pass_once() == []  # first sighting only
    assert rec.pass_once() == []  # confirmed, but another replica's attacher leads
    assert _hosts(agent, "v-stale") == [W1]
    leader[0] = True
    assert rec.pass_once() == [Publish(ids["v-stale"], W1)]
    assert _hosts(agent, "v-stale") == [] and _hosts(agent, "v-kept") == [W1]
    assert rec.pass_once() == [] and _hosts(agent, "v-kept") == [W1]


def test_a_volumeattachment_that_appears_before_the_unpublish_wins(
        storage: tuple[FakeAgent, ControllerService]) -> None:
    agent, ctrl = storage
    ids = _ids(agent)
    views = [kube({}, {"worker-1": W1})] * 2 + [kube({ids["v-stale"]: {"worker-1"}, ids["v-kept"]: {"worker-1"}},
                                                     {"worker-1": W1})]
    seen = iter(views)
    current = [views[0]]

    def lister() -> KubeAttachments:
        current[0] = next(seen, current[0])
        return current[0]

    rec = Reconciler(ctrl.pool, lister, lambda p, still: ctrl.unpublish_if(p.volume_id, p.host, still))
    rec.pass_once()
    # Second pass: both confirmed stale from its listing; the re-check under the volume lock
    # sees the VolumeAttachments an attach made meanwhile, so nothing is unpublished.
    assert rec.pass_once() == []
    assert _hosts(agent, "v-stale") == [W1] and _hosts(agent, "v-kept") == [W1]


def test_publishes_of_an_unreachable_storage_node_are_neither_counted_nor_forgotten(sockdir: str) -> None:
    agent = FakeAgent("s0")
    server = serve_fake_agent(agent, f"{sockdir}/s0.sock")
    pool = AgentPool(lambda: parse_static(f"s0=unix://{sockdir}/s0.sock,s1=unix://{sockdir}/none.sock"),
                     tls=None, timeout=2)
    try:
        vid = agent.CreateVolume(agent_pb2.CreateVolumeRequest(name="v", size_bytes=1 << 30), None).volume.id
        agent.PublishVolume(agent_pb2.PublishVolumeRequest(volume_id=vid, host_nqn=W1), None)
        ctrl = ControllerService(pool)
        cleared: list[Publish] = []
        rec = Reconciler(pool, lambda: kube({}, {}),
                         lambda p, still: bool(still() and not cleared.append(p)))  # type: ignore[func-returns-value]
        rec._seen[Publish("s1/vother", W2)] = 1  # seen on s1 before it went away
        assert rec.pass_once() == [] and rec._seen == {Publish("s1/vother", W2): 1, Publish(f"s0/{vid}", W1): 1}
        assert rec.pass_once() == [Publish(f"s0/{vid}", W1)]
        assert rec._seen == {Publish("s1/vother", W2): 1}
        del ctrl
    finally:
        pool.close()
        server.stop(None)


def test_run_keeps_going_after_a_failed_pass() -> None:
    calls: list[int] = []

    class Boom(Reconciler):
        def pass_once(self) -> list[Publish]:
            calls.append(1)
            if len(calls) >= 3:
                stop.set()
            raise RuntimeError("api server down")

    stop = threading.Event()
    Boom(None, lambda: kube({}, {}), lambda p, s: False).run(stop, 0.01)  # type: ignore[arg-type]
    assert len(calls) == 3
