"""Per-operation latency through the agent's gRPC next to bare `zfs` CLI and pyzfs on the same pool.

A measurement, not a timed assertion (TCG makes absolute numbers meaningless; compare ratios).
Run: pytest tests/lab/test_agent_latency.py -m "lab and slow" -s
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.lab, pytest.mark.slow]

MiB = 1 << 20
ROUNDS = 5
T = 120

BARE = r"""
import json, subprocess, time, uuid
import libzfs_core as lzc
ROUNDS, SIZE, base = {rounds}, {size}, "tank/zvolt-bare-" + uuid.uuid4().hex[:6]
def run(*a): subprocess.run(list(a), check=True, capture_output=True)
def t(fn, *a):
    s = time.perf_counter(); fn(*a); return time.perf_counter() - s
out = {{k: [] for k in ("zfs create", "lzc create", "zfs snapshot", "lzc snapshot", "zfs clone", "lzc clone",
                       "zfs set volmode=dev", "zfs set volmode=none", "zfs destroy", "lzc destroy")}}
run("zfs", "create", "-o", "volmode=none", base)
for i in range(ROUNDS):
    c, l = f"{{base}}/c{{i}}", f"{{base}}/l{{i}}"
    out["zfs create"].append(t(run, "zfs", "create", "-s", "-V", str(SIZE), "-o", "volmode=none", c))
    out["lzc create"].append(t(lzc.lzc_create, l.encode(), "zvol", {{b"volsize": SIZE, b"volblocksize": 16384,
                                                                     b"volmode": 3}}))
    out["zfs snapshot"].append(t(run, "zfs", "snapshot", c + "@s"))
    out["lzc snapshot"].append(t(lzc.lzc_snapshot, [(l + "@s").encode()]))
    out["zfs clone"].append(t(run, "zfs", "clone", "-o", "volmode=none", c + "@s", c + "k"))
    out["lzc clone"].append(t(lzc.lzc_clone, (l + "k").encode(), (l + "@s").encode(), {{b"volmode": 3}}))
    out["zfs set volmode=dev"].append(t(run, "zfs", "set", "volmode=dev", c))
    run("udevadm", "settle")
    out["zfs set volmode=none"].append(t(run, "zfs", "set", "volmode=none", c))
    run("udevadm", "settle")
    out["zfs destroy"].append(t(run, "zfs", "destroy", c + "k"))
    run("zfs", "destroy", c + "@s"); run("zfs", "destroy", c)
    run("udevadm", "settle")
    out["lzc destroy"].append(t(lzc.lzc_destroy, (l + "k").encode()))
    lzc.lzc_destroy_snaps([(l + "@s").encode()], False); lzc.lzc_destroy(l.encode())
run("zfs", "destroy", "-r", base)
print(json.dumps(out))
"""


def _timed(call: Callable[..., Any], req: object) -> tuple[Any, float]:
    s = time.perf_counter()
    out = call(req, timeout=T)
    return out, time.perf_counter() - s


def test_agent_latency_vs_bare_zfs(lab: object) -> None:
    lab.start_agent()  # type: ignore[attr-defined]
    channel = grpc.insecure_channel(lab.grpc_target("agent"))  # type: ignore[attr-defined]
    stub = pb_grpc.AgentStub(channel)
    deadline = time.monotonic() + 300
    while not stub.GetInfo(pb.GetInfoRequest(), timeout=10).ready:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    host = f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"
    agent: dict[str, list[float]] = {k: [] for k in ("create", "snapshot", "clone", "publish", "unpublish",
                                                     "delete clone", "get info")}
    tag = uuid.uuid4().hex[:6]
    for i in range(ROUNDS):
        name = f"lat-{tag}-{i}"
        vol, dt = _timed(stub.CreateVolume, pb.CreateVolumeRequest(name=name, size_bytes=64 * MiB))
        agent["create"].append(dt)
        snap, dt = _timed(stub.CreateSnapshot, pb.CreateSnapshotRequest(name=name + "-s",
                                                                         source_volume_id=vol.volume.id))
        agent["snapshot"].append(dt)
        clone, dt = _timed(stub.CreateVolume, pb.CreateVolumeRequest(name=name + "-c", size_bytes=64 * MiB,
                                                                      source_snapshot_id=snap.snapshot.id))
        agent["clone"].append(dt)
        agent["publish"].append(_timed(stub.PublishVolume, pb.PublishVolumeRequest(
            volume_id=vol.volume.id, host_nqn=host))[1])
        agent["unpublish"].append(_timed(stub.UnpublishVolume, pb.UnpublishVolumeRequest(
            volume_id=vol.volume.id, host_nqn=host))[1])
        agent["delete clone"].append(_timed(stub.DeleteVolume, pb.DeleteVolumeRequest(volume_id=clone.volume.id))[1])
        agent["get info"].append(_timed(stub.GetInfo, pb.GetInfoRequest())[1])
        stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot.id), timeout=T)
        stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume.id), timeout=T)
    channel.close()
    bare = json.loads(lab.py(BARE.format(rounds=ROUNDS, size=64 * MiB), timeout=1200).stdout)  # type: ignore

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1000:8.1f} ms"

    lines = [f"agent gRPC (host -> guest unix socket), median of {ROUNDS}:"]
    lines += [f"  {k:<22}{med(v)}" for k, v in agent.items()]
    lines += ["bare ZFS in the guest (same pool):"]
    lines += [f"  {k:<22}{med(v)}" for k, v in bare.items()]
    print("\n" + "\n".join(lines))
    assert all(len(v) == ROUNDS for v in agent.values())
