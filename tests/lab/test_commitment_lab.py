"""The commitment limit on the real stack: an agent with a small --commitment-ratio on the lab's
ZFS pool takes volumes up to the limit, refuses the next one, a restore, a clone and a growth
with RESOURCE_EXHAUSTED naming the limit, and takes a new volume again once one is deleted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from test_agent_lab import PARENT, Env, T, uniq, wait_ready  # type: ignore[import-not-found]

from zvolt.pb import agent_pb2 as pb

pytestmark = pytest.mark.lab

MiB = 1 << 20
STEP = 16 * MiB  # a multiple of every volblocksize
RATIO = "0.05"  # of the lab's 16 GiB pool: a limit near 800 MiB


@pytest.fixture(scope="module")
def env(lab: object) -> Iterator[Env]:
    e = Env(lab)
    e.restart("--commitment-ratio", RATIO)
    wait_ready(e.stub)
    yield e
    e.restart()  # the lab's defaults again, for whatever runs next
    wait_ready(e.stub)
    e.channel.close()


def capacity(env: Env) -> Any:
    return env.stub.GetCapacity(pb.GetCapacityRequest(), timeout=T)


def refused(call: object, request: object) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=T)  # type: ignore[operator]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    return str(err.value.details())


def test_volumes_up_to_the_commitment_limit_then_refused(env: Env) -> None:
    t0 = time.monotonic()
    cap = capacity(env)
    assert cap.commitment_limit_ratio == float(RATIO)
    limit = int(float(RATIO) * cap.total_bytes)
    assert cap.commitment_available_bytes == limit - cap.committed_bytes
    a_size = cap.commitment_available_bytes // 3 // STEP * STEP
    a = env.create(uniq("near-a"), a_size)
    snap = env.snapshot(uniq("near-snap"), a.id)
    charge = capacity(env).committed_bytes - cap.committed_bytes - a_size
    # An empty volume's snapshot references a few metadata blocks: that is all it can pin.
    assert 0 < charge < MiB, charge
    b_size = capacity(env).commitment_available_bytes // STEP * STEP
    b = env.create(uniq("near-b"), b_size)
    full = capacity(env)
    assert full.committed_bytes == cap.committed_bytes + a_size + charge + b_size
    assert full.commitment_available_bytes < STEP

    msg = refused(env.stub.CreateVolume, pb.CreateVolumeRequest(name=uniq("near-c"), size_bytes=2 * STEP))
    assert "commitment limit of storage node" in msg and f"limit of {limit} bytes" in msg, msg
    assert f"pool size {full.total_bytes} bytes" in msg and f"{full.committed_bytes} bytes committed" in msg, msg
    msg = refused(env.stub.CreateVolume, pb.CreateVolumeRequest(name=uniq("near-restore"), size_bytes=a_size,
                                                                source_snapshot_id=snap.id))
    assert "commitment limit" in msg and "clone" in msg, msg
    msg = refused(env.stub.CreateVolume, pb.CreateVolumeRequest(name=uniq("near-clone"), size_bytes=a_size,
                                                                source_volume_id=a.id))
    assert "commitment limit" in msg and "clone" in msg, msg
    msg = refused(env.stub.ExpandVolume, pb.ExpandVolumeRequest(volume_id=a.id, size_bytes=a_size + 2 * STEP))
    assert "commitment limit" in msg and f"growing volume {a.id}" in msg, msg
    assert int(env.zget(f"{PARENT}/v/{a.id}", "volsize")) == a_size
    assert capacity(env).committed_bytes == full.committed_bytes  # refusals leave nothing behind

    env.delete(b.id)
    restore = env.create(uniq("near-restore"), a_size, source_snapshot_id=snap.id)
    assert capacity(env).committed_bytes == full.committed_bytes - b_size + a_size
    print(f"\ncommitment lab: limit {limit} bytes ({RATIO} x {full.total_bytes}), volumes of {a_size} and "
          f"{b_size} bytes, snapshot charged {charge} bytes; {time.monotonic() - t0:.1f} s", flush=True)
    for vid in (restore.id, a.id):
        env.delete(vid)
    env.delete_snap(snap.id)
    assert capacity(env).committed_bytes == cap.committed_bytes
