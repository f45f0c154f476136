"""Draining a storage node on two storage guests (lab/cluster.py) with real ZFS (csi/drain.py).

storage-0 holds three idle volumes with data and one published volume. The one-shot entry point
`zvolt-csi --mode drain --from storage-0` (what `kubectl zvolt drain-storage` runs in the
controller container) cordons it, prints the plan, moves the three to storage-1 over the
storage network (their data read back there hashes the same), lists the published one as
blocked and leaves it as it was, and exits 1 (something is left). After the drain no new volume
lands on storage-0: neither from a controller whose capacity view predates the cordon (the
agent refuses, the create goes on to storage-1) nor from a fresh one (placement skips it).

Run: ZVOLT_LAB_NAME=drain pytest tests/lab/test_drain_cluster_lab.py -s
"""

from __future__ import annotations

import contextlib
import io
import time

import pytest

import csi.main
from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from csi.drain import ATTACHED
from lab import cluster
from lab.guest import POOL
from tests.lab.test_move_cluster_lab import ZVOL_IO, cap, members, spec, volumes_on  # noqa: F401 - fixture
from tests.lab.test_multinode_lab import storage_cluster  # noqa: F401 - the fixture, booted here too
from zvolt.names import split_volume_id
from zvolt.pb import agent_pb2, csi_pb2

# slow: two guests at once (7-12 min with boots under TCG), like the other multi-guest tests.
pytestmark = [pytest.mark.lab, pytest.mark.slow]

MiB = 1 << 20
GiB = 1 << 30
T = 180
DATA_MIB = 16
HOST = "nqn.2026-11.io.zvolt:host:worker-0:22222222-2222-4222-8222-222222222222"
SOURCE, TARGET = "storage-0", "storage-1"


def zvol_hash(member: cluster.Member, vid: str, write: bool) -> str:
    out = member.lab.run(["python3", "-c", ZVOL_IO, f"{POOL}/zvolt/v/{vid}", "write" if write else "read",
                          str(DATA_MIB)], timeout=600)
    return str(out.stdout.strip().splitlines()[-1])


def create(ctl: ControllerService, name: str) -> str:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap()],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))
    return str(ctl.CreateVolume(req, None).volume.volume_id)


def test_drain_moves_the_idle_volumes_leaves_the_attached_one_and_cordons(
        members: list[cluster.Member]) -> None:  # noqa: F811
    by_node = {m.node: m for m in members}
    assert {SOURCE, TARGET} <= set(by_node)
    pool = AgentPool(lambda: parse_static(spec(members)), tls=None, timeout=T)
    source = pool.get(SOURCE)
    before = ControllerService(pool)
    stamp = str(int(time.time()))
    idle: list[str] = []
    made: list[str] = []
    try:
        # A controller that placed a volume before the drain: its capacity view is taken now. The
        # volume is idle: on storage-0 it is drained too.
        made.append(create(before, f"pvc-early-{stamp}"))
        moving = 3 + (split_volume_id(made[0])[0] == SOURCE)
        for i in range(3):
            vol = source.call("CreateVolume", agent_pb2.CreateVolumeRequest(
                name=f"pvc-idle-{i}-{stamp}", size_bytes=(i + 1) * 64 * MiB), timeout=T).volume
            idle.append(vol.id)
            made.append(f"{SOURCE}/{vol.id}")
        hashes = {vid: zvol_hash(by_node[SOURCE], vid, write=True) for vid in idle}
        pub = source.call("CreateVolume", agent_pb2.CreateVolumeRequest(
            name=f"pvc-attached-{stamp}", size_bytes=64 * MiB), timeout=T).volume.id
        made.append(f"{SOURCE}/{pub}")
        source.call("PublishVolume", agent_pb2.PublishVolumeRequest(volume_id=pub, host_nqn=HOST), timeout=T)

        out = io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(out):
            code = csi.main.main(["--mode=drain", f"--agents={spec(members)}", "--insecure", "--log-level=error",
                                  f"--from={SOURCE}", "--parallel=2"])
        took = time.monotonic() - t0
        text = out.getvalue()
        print(f"\n{text}one-shot drain: exit {code} in {took:.1f} s", flush=True)
        assert code == 1, "the attached volume is left on the node"
        lines = text.splitlines()
        assert lines[0].startswith(f"storage node {SOURCE} is cordoned")
        assert lines[1] == f"plan: {moving} to move, 1 blocked"
        assert any(ln.startswith(f"  blocked {SOURCE}/{pub}: attached (published to {HOST})") and ATTACHED in ln
                   for ln in lines)
        assert any(ln.startswith(f"drain of {SOURCE}: {moving} moved, ") for ln in lines)

        for vid in idle:
            assert volumes_on(by_node[SOURCE], vid) == [], f"{vid}: the source's copy must be gone"
            assert zvol_hash(by_node[TARGET], vid, write=False) == hashes[vid], vid
        kept = source.call("GetVolume", agent_pb2.GetVolumeRequest(volume_id=pub), timeout=T)
        assert kept.placement == agent_pb2.PLACEMENT_HELD and list(kept.volume.published_hosts) == [HOST]
        assert volumes_on(by_node[TARGET], pub) == []

        # Nothing new lands on the drained node: a stale view is refused by the agent, a fresh one skips it.
        for ctl, name in ((before, "stale"), (ControllerService(pool), "fresh")):
            t0 = time.monotonic()
            vid = create(ctl, f"pvc-after-{name}-{stamp}")
            made.append(vid)
            print(f"CreateVolume after the drain ({name} view) -> {vid} in {time.monotonic() - t0:.1f} s", flush=True)
            assert split_volume_id(vid)[0] == TARGET
    finally:
        with contextlib.suppress(Exception):
            source.call("UnpublishVolume", agent_pb2.UnpublishVolumeRequest(volume_id=pub, host_nqn=HOST), timeout=T)
        with contextlib.suppress(Exception):
            source.call("SetCordon", agent_pb2.SetCordonRequest(cordoned=False), timeout=T)
        cleanup = ControllerService(pool)
        for left in made:
            with contextlib.suppress(Exception):
                cleanup.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=left), None)
        pool.close()
