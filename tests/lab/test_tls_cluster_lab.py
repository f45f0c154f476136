"""NVMe/TCP TLS between two kernels: a host holding a wrong PSK is refused.

In one guest the target's and the host's PSKs share one kernel keyring (test_tls_lab.py), so a
wrong key on the host side is only meaningful on two machines. Here storage-0's agent exports a
TLS volume on the lab cluster's storage network and storage-1 is the host, in its storage netns,
with the node plugin's own NVMe adapter and its own kernel keyring and tlshd. A wrong PSK fails
the handshake; the volume's PSK connects and carries data; clear text reads nothing.

Slow (two guests, 7-12 min with boots under TCG); needs the tlshd bundle (test_tls_lab.py).
Run: python -m pytest tests/lab/test_tls_cluster_lab.py
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from test_tls_lab import (  # type: ignore[import-not-found]
    BLOCK,
    HOST,
    TLS_PORT,
    clear_text_read,
    connect,
    controller,
    host_py,
    start_tlshd,
    stop_tlshd,
    tlshd_journal,
)

from lab import cluster
from lab.guest import STORAGE_NS, unit_name
from tests.lab.test_multinode_lab import storage_cluster  # noqa: F401 - the fixture, booted here too
from zvolt import tlspsk
from zvolt.names import volume_host_id
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.lab, pytest.mark.slow]

T = 180
MiB = 1 << 20


def _say(what: str) -> None:
    print(f"\nTLS-2 {what}", flush=True)


@pytest.fixture(scope="module")
def pair(storage_cluster: list[cluster.Member]) -> Iterator[tuple[cluster.Member, cluster.Member, str]]:  # noqa: F811
    """storage-0 exports on its storage-network address; storage-1 is the host."""
    target, host = storage_cluster[0], storage_cluster[1]
    address = cluster.storage_ips(storage_cluster)[target.node]
    for m in (target, host):
        start_tlshd(m.lab, [STORAGE_NS])
    target.lab.run(["systemctl", "stop", unit_name("agent")], timeout=T, check=False)
    target.lab.start_agent("--nvme-listen", f"{address}:4420")
    yield target, host, address
    for m in (target, host):
        stop_tlshd(m.lab, [STORAGE_NS])
    target.lab.run(["systemctl", "stop", unit_name("agent")], timeout=T, check=False)
    target.lab.start_agent()


def test_a_host_with_a_wrong_psk_is_refused_by_another_kernel(
        pair: tuple[cluster.Member, cluster.Member, str]) -> None:
    target, host, address = pair
    channel = grpc.insecure_channel(target.lab.grpc_target("agent"))
    agent = pb_grpc.AgentStub(channel)
    deadline = time.monotonic() + T
    while True:
        try:
            agent.GetInfo(pb.GetInfoRequest(), timeout=10)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    vol = agent.CreateVolume(pb.CreateVolumeRequest(name=f"tls2-{uuid.uuid4().hex[:8]}", size_bytes=64 * MiB),
                             timeout=T).volume
    psk = tlspsk.generate()
    resp = agent.PublishVolume(pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=HOST, tls_psk=psk), timeout=T)
    assert (resp.address, resp.port) == (address, TLS_PORT)
    nqn, hostnqn, hostid = resp.nqn, resp.host_nqn, volume_host_id(HOST, vol.id)
    try:
        wrong = tlspsk.generate()
        started = time.monotonic()
        with pytest.raises(Exception) as err:
            connect(host.lab, nqn, hostnqn, hostid, wrong, address=address, netns=STORAGE_NS)
        assert "TLS connect" in str(err.value) and wrong not in str(err.value), str(err.value)[-500:]
        assert controller(host.lab, nqn, STORAGE_NS) == {}
        _say(f"wrong PSK refused in {time.monotonic() - started:.1f} s")
        _say("target's tlshd: " + " | ".join(line for line in tlshd_journal(target.lab, [STORAGE_NS]).splitlines()
                                             if "andshake" in line or "rror" in line)[-400:])
        host_py(host.lab, f"host.forget_psks({hostnqn!r}, {nqn!r}); print(json.dumps(1))", STORAGE_NS)

        started = time.monotonic()
        device = connect(host.lab, nqn, hostnqn, hostid, psk, address=address, netns=STORAGE_NS)
        ctrl = controller(host.lab, nqn, STORAGE_NS)
        assert ctrl["state"] == "live" and ctrl["tls_key"], ctrl
        _say(f"the volume's PSK connected in {time.monotonic() - started:.1f} s (controller {ctrl['name']})")
        marker = (f"zvolt-tls2-{uuid.uuid4().hex}|".encode() * 200)[:BLOCK]
        host.lab.run(["dd", f"of={device}", "bs=4096", "count=1", "oflag=direct", "status=none"],
                     netns=STORAGE_NS, input=marker.decode())
        got = host.lab.run(["dd", f"if={device}", "bs=4096", "count=1", "iflag=direct", "status=none"],
                           netns=STORAGE_NS)
        assert got.stdout.encode() == marker
        # The bytes on the target's zvol are the marker: the data went through, decrypted there.
        plain = clear_text_read(host.lab, nqn, hostnqn, hostid, TLS_PORT, address=address, netns=STORAGE_NS)
        assert not plain["ok"], plain
        _say(f"clear text on the TLS port: {plain.get('step')}: {str(plain.get('error', ''))[:100]}")
        host_py(host.lab, f"host.disconnect({ctrl['name']!r}); host.forget_psks({hostnqn!r}, {nqn!r}); "
                          "print(json.dumps(1))", STORAGE_NS)
    finally:
        agent.UnpublishVolume(pb.UnpublishVolumeRequest(volume_id=vol.id, host_nqn=hostnqn), timeout=T)
        agent.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id), timeout=T)
        channel.close()
