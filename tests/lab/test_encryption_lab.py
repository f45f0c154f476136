"""Encryption at rest on the real stack: ZFS native encryption (aes-256-gcm) in the guest, data
through NVMe/TCP from the worker netns, the agent with a key wrapping file.

The storage-node reboot is simulated in the one guest (as in test_faults_lab.py): the agent is
SIGKILLed, every nvmet object is removed, and every key under the parent dataset is unloaded,
which is what a reboot leaves (ZFS loads no key at import: keylocation=prompt). ZFS, the pool and
the agent's state dir stay, as they do on disk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from test_agent_lab import (  # type: ignore[import-not-found]
    PARENT,
    WIPE,
    Env,
    T,
    agent_session,
    host_nqn,
    uniq,
    vds,
    wait_ready,
)

from zvolt.pb import agent_pb2 as pb

pytestmark = pytest.mark.lab

MiB = 1 << 20
WRAP_FILE = "/var/lib/zvolt-wrapping.key"  # outside the state dir, as a mounted Secret would be


@pytest.fixture(scope="module")
def env(lab: object) -> Iterator[Env]:
    lab.run(["install", "-m", "0600", "/dev/null", WRAP_FILE])  # type: ignore[attr-defined]
    lab.run(["tee", WRAP_FILE], input=os.urandom(32).hex())  # type: ignore[attr-defined]
    with agent_session(lab, fresh=False, restore=True) as e:
        e.restart("--key-wrapping-file", WRAP_FILE)
        wait_ready(e.stub)
        yield e


def restart(env: Env) -> None:
    env.restart("--key-wrapping-file", WRAP_FILE)
    wait_ready(env.stub)


def publish(env: Env, vid: str, host: str, key: bytes) -> Any:
    return env.stub.PublishVolume(pb.PublishVolumeRequest(volume_id=vid, host_nqn=host, encryption_key=key),
                                  timeout=T)


def keystatus(env: Env, vid: str) -> str:
    return str(env.zget(vds(vid), "keystatus"))


def code(fn: Any, *args: Any, **kw: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kw)
    return err.value.code(), str(err.value.details())


# The pool's disk read raw (the lab's pool is /dev/vdb1, lab.md): at every block `zdb` says each
# volume's data object holds (zdb reads block pointers without the key), and the whole region
# around those blocks (a fixed "first 256 MiB" missed the plain volume's blocks in CI, where
# earlier tests had filled the pool). A DVA offset counts from the end of the 4 MiB of labels and
# boot area at the start of the vdev.
SCAN = """
import os, re, subprocess
disk, markers = {disk!r}, [m.encode() for m in {markers!r}]
LABELS = 4 << 20
found = {{}}
fd = os.open(disk, os.O_RDONLY)
extents = []
for ds, marker in zip({datasets!r}, markers):
    out = subprocess.run(["zdb", "-ddddd", ds, "1"], capture_output=True, text=True, check=True).stdout
    dvas = [(LABELS + int(off, 16), int(size, 16)) for _, off, size in
            re.findall(r" L0 ([0-9]+):([0-9a-f]+):([0-9a-f]+) ", out)]
    assert len(dvas) >= 64, out[-2000:]
    found[marker] = [sum(os.pread(fd, size, off).count(marker) for off, size in dvas), len(dvas)]
    extents += dvas
# Beyond the listed blocks: the whole neighbourhood both volumes were written to (16 MiB either
# side, at most 512 MiB: a full-disk scan takes over 13 minutes under TCG). Where the pool put
# them depends on what the guest wrote before, so the region follows the blocks.
lo = max(0, min(o for o, _ in extents) - (16 << 20))
hi = min(max(o + n for o, n in extents) + (16 << 20), lo + (512 << 20))
counts = dict.fromkeys(markers, 0)
keep = max(len(m) for m in markers) - 1
tail = b""
for start in range(lo, hi, 32 << 20):
    chunk = tail + os.pread(fd, min(32 << 20, hi - start), start)
    for m in markers:
        counts[m] += chunk.count(m)
    tail = chunk[-keep:]  # too short to hold a whole marker: none is counted twice
for marker in markers:
    found[marker].append(counts[marker])
print((hi - lo) >> 20, " ".join(f"{{a}}/{{b}}/{{c}}" for a, b, c in found.values()))
"""

WRITE_MARKED = """
import mmap, os
fd = os.open({dev!r}, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
rnd = os.urandom(1 << 20)
marker = {marker!r}.encode()
# Random data (lz4 cannot shrink it) with the marker at the start of every 4 KiB block.
block = bytearray(rnd)
for off in range(0, 1 << 20, 4096):
    block[off:off + len(marker)] = marker
buf.write(bytes(block))
assert os.pwritev(fd, [buf], 0) == 1 << 20
os.fsync(fd)
os.close(fd)
"""


def pool_disk(env: Env) -> str:
    out = env.lab.run(["zpool", "list", "-v", "-H", "-P", "-o", "name", "tank"]).stdout  # type: ignore[attr-defined]
    disks = [w for line in out.splitlines() for w in line.split() if w.startswith("/dev/")]
    assert disks, out
    return str(disks[0])


def test_data_on_the_pool_is_not_readable_without_the_key(env: Env) -> None:
    """The same marked 1 MiB written through NVMe/TCP to an encrypted and a plain volume: the raw
    pool disk holds the plain volume's markers (so the scan can find them) and none of the other's."""
    host = host_nqn()
    key = os.urandom(32)
    enc = env.create(uniq("enc"), 64 * MiB, encryption_key=key)
    plain = env.create(uniq("plain"), 64 * MiB)
    assert env.zget(vds(enc.id), "encryption") == "aes-256-gcm"
    assert env.zget(vds(enc.id), "keyformat") == "hex"
    assert env.zget(vds(plain.id), "encryption") == "off"
    assert keystatus(env, enc.id) == "unavailable", "the key stays loaded after create"
    assert env.get(enc.id).encrypted and not env.get(plain.id).encrypted
    markers = {enc.id: f"ZVOLT-ENC-{os.urandom(8).hex()}", plain.id: f"ZVOLT-PLAIN-{os.urandom(8).hex()}"}
    for vol in (enc, plain):
        pub = publish(env, vol.id, host, key if vol is enc else b"")
        dev = env.connect(pub.nqn, host)
        env.lab.py(WRITE_MARKED.format(dev=dev, marker=markers[vol.id]), netns="worker", timeout=300)  # type: ignore
        env.disconnect(pub.nqn)
        env.unpublish(vol.id, host)
    assert keystatus(env, enc.id) == "unavailable", "the key stays loaded after the last unpublish"
    env.lab.run(["zpool", "sync", "tank"])  # type: ignore[attr-defined]
    t0 = time.monotonic()
    code = SCAN.format(disk=pool_disk(env), markers=[markers[enc.id], markers[plain.id]],
                       datasets=[vds(enc.id), vds(plain.id)])
    region_mib, *out = env.lab.py(code, timeout=600).stdout.split()  # type: ignore[attr-defined]
    (enc_blocks, enc_n, enc_head), (plain_blocks, plain_n, plain_head) = (map(int, o.split("/")) for o in out)
    print(f"\nraw read of the pool disk in {time.monotonic() - t0:.1f}s, markers found (256 written to each): "
          f"encrypted volume {enc_blocks} in its {enc_n} blocks and {enc_head} in the {region_mib} MiB around "
          f"both volumes' blocks; plain volume {plain_blocks} in its {plain_n} blocks and {plain_head} there")
    assert plain_blocks == 256 and plain_head >= 256  # the reads find data that is in the clear
    assert enc_blocks == 0 and enc_head == 0
    env.delete(enc.id)
    env.delete(plain.id)


def test_wrong_or_missing_key_is_refused_clearly(env: Env) -> None:
    host = host_nqn()
    key = os.urandom(32)
    vol = env.create(uniq("wk"), 64 * MiB, encryption_key=key)
    status, msg = code(publish, env, vol.id, host, os.urandom(32))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "not the key of" in msg, msg
    status, msg = code(publish, env, vol.id, host, b"")
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "needs its key" in msg, msg
    assert keystatus(env, vol.id) == "unavailable"
    assert env.get(vol.id).published_hosts == []
    env.delete(vol.id)


def test_branch_and_expand_an_encrypted_volume(env: Env) -> None:
    host = host_nqn()
    key = os.urandom(32)
    vol = env.create(uniq("be"), 64 * MiB, encryption_key=key)
    pub = publish(env, vol.id, host, key)
    dev = env.connect(pub.nqn, host)
    written = env.write(dev, seed=21)
    env.disconnect(pub.nqn)
    snap = env.snapshot(uniq("be-s"), vol.id)
    env.unpublish(vol.id, host)
    status, msg = code(env.create, uniq("be-bad"), 64 * MiB, source_snapshot_id=snap.id,
                       encryption_key=os.urandom(32))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "not the key of" in msg, msg
    clone = env.create(uniq("be-c"), 64 * MiB, source_snapshot_id=snap.id, encryption_key=key)
    assert env.zget(vds(clone.id), "encryptionroot") == vds(vol.id)
    assert keystatus(env, clone.id) == "unavailable"
    grown = env.stub.ExpandVolume(pb.ExpandVolumeRequest(volume_id=clone.id, size_bytes=128 * MiB,
                                                         encryption_key=key), timeout=T).volume
    assert grown.size_bytes == 128 * MiB and env.zget(vds(clone.id), "volsize") == str(128 * MiB)
    assert keystatus(env, clone.id) == "unavailable"
    cpub = publish(env, clone.id, host, key)
    dev = env.connect(cpub.nqn, host)
    try:
        assert env.read_hash(dev) == written
        assert env.size_of(dev) == 128 * MiB
    finally:
        env.disconnect(cpub.nqn)
    env.unpublish(clone.id, host)
    env.delete(clone.id)
    env.delete_snap(snap.id)
    env.delete(vol.id)


def test_agent_restart_keeps_the_export_working(env: Env) -> None:
    host = host_nqn()
    key = os.urandom(32)
    vol = env.create(uniq("rs"), 64 * MiB, encryption_key=key)
    pub = publish(env, vol.id, host, key)
    try:
        dev = env.connect(pub.nqn, host)
        written = env.write(dev, seed=31)
        env.lab.stop_service("agent", kill=True)  # type: ignore[attr-defined]
        restart(env)
        assert keystatus(env, vol.id) == "available"
        assert env.read_hash(dev) == written
        assert env.get(vol.id).condition == pb.VOLUME_CONDITION_HEALTHY
    finally:
        env.disconnect(pub.nqn)
    env.unpublish(vol.id, host)
    assert keystatus(env, vol.id) == "unavailable"
    env.delete(vol.id)


def test_reboot_reloads_keys_of_published_volumes_only(env: Env) -> None:
    host = host_nqn()
    key = os.urandom(32)
    published = env.create(uniq("rb-p"), 64 * MiB, encryption_key=key)
    idle = env.create(uniq("rb-i"), 64 * MiB, encryption_key=key)
    pub = publish(env, published.id, host, key)
    dev = env.connect(pub.nqn, host)
    written = env.write(dev, seed=41)
    env.disconnect(pub.nqn)
    # What a reboot leaves: no agent, no nvmet objects, no keys loaded.
    env.lab.stop_service("agent", kill=True)  # type: ignore[attr-defined]
    env.lab.py(WIPE)  # type: ignore[attr-defined]
    env.lab.run(["zfs", "unload-key", "-r", PARENT])  # type: ignore[attr-defined]
    assert keystatus(env, published.id) == "unavailable"
    restart(env)
    assert keystatus(env, published.id) == "available"
    assert keystatus(env, idle.id) == "unavailable", "a key was loaded for a volume nobody uses"
    assert env.get(published.id).condition == pb.VOLUME_CONDITION_HEALTHY
    dev = env.connect(pub.nqn, host)
    try:
        assert env.read_hash(dev) == written
    finally:
        env.disconnect(pub.nqn)
    env.unpublish(published.id, host)
    env.delete(published.id)
    env.delete(idle.id)


def test_rotate_key_without_copying(env: Env) -> None:
    host = host_nqn()
    old, new = os.urandom(32), os.urandom(32)
    vol = env.create(uniq("rk"), 64 * MiB, encryption_key=old)
    pub = publish(env, vol.id, host, old)
    dev = env.connect(pub.nqn, host)
    try:
        written = env.write(dev, seed=51)
        used = env.zget(vds(vol.id), "used")
        root = env.stub.RotateKey(pb.RotateKeyRequest(volume_id=vol.id, old_key=old, new_key=new),
                                  timeout=T).encryption_root
        assert root == vol.id
        assert env.read_hash(dev) == written  # the live export never noticed
        assert env.zget(vds(vol.id), "used") == used
    finally:
        env.disconnect(pub.nqn)
    env.unpublish(vol.id, host)
    status, _ = code(publish, env, vol.id, host, old)
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    pub = publish(env, vol.id, host, new)
    dev = env.connect(pub.nqn, host)
    try:
        assert env.read_hash(dev) == written
    finally:
        env.disconnect(pub.nqn)
    env.unpublish(vol.id, host)
    env.delete(vol.id)


@pytest.mark.faults
def test_real_reboot_reloads_keys_of_published_volumes_only(env: Env) -> None:
    """The same as the simulated reboot above, with a real one: sysrq 'b' on the guest (no sync,
    no clean shutdown; qemu keeps the disks). The kernel forgets every key and nvmet object; the
    agent's kept (wrapped) keys come back from its state dir, and only the published volume's
    key is loaded again. The wrapping-key file stands for the mounted Secret, which kubelet
    provides again after a reboot: it is made durable first, as the Secret would be re-mounted."""
    import sys

    from lab import control
    from lab.paths import Cache, instance_from_env

    host = host_nqn()
    key = os.urandom(32)
    published = env.create(uniq("rr-p"), 64 * MiB, encryption_key=key)
    idle = env.create(uniq("rr-i"), 64 * MiB, encryption_key=key)
    pub = publish(env, published.id, host, key)
    dev = env.connect(pub.nqn, host)
    written = env.write(dev, seed=61)
    env.disconnect(pub.nqn)
    env.lab.run(["python3", "-c", f"import os; os.fsync(os.open({WRAP_FILE!r}, os.O_RDONLY))"])  # type: ignore
    env.lab.run(["zpool", "sync"])  # type: ignore[attr-defined]
    rb = control.reboot(Cache.from_env(), instance_from_env(), sys.stderr)
    assert keystatus(env, published.id) == "unavailable", "a key survived the reboot?"
    t0 = time.monotonic()
    restart(env)
    ready_s = time.monotonic() - t0
    assert keystatus(env, published.id) == "available"
    assert keystatus(env, idle.id) == "unavailable", "a key was loaded for a volume nobody uses"
    assert env.get(published.id).condition == pb.VOLUME_CONDITION_HEALTHY
    dev = env.connect(pub.nqn, host)
    try:
        assert env.read_hash(dev) == written
    finally:
        env.disconnect(pub.nqn)
    env.unpublish(published.id, host)
    env.delete(published.id)
    env.delete(idle.id)
    print(f"\nreal reboot: guest back in {rb.down_seconds:.0f}s, set up in {rb.setup_seconds:.0f}s, agent ready "
          f"{ready_s:.1f}s after start with the published volume's key loaded and the idle one's not")
