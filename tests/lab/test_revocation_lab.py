"""Revocation on the real stack: UnpublishVolume of one host ends that host's I/O, even on a
subsystem it shares with another host, and the other host keeps working.

Two kernel initiators with different host NQNs and host ids (two worker nodes as nvmet sees
them) in the guest's root network namespace, with a veth pair of their own into the storage
netns: nvme-tcp reconnects from a kernel worker in the root netns (see test_faults_lab.py), and
both the revoked host's refused reconnect and the other host's successful one are part of what
is checked. The lab boots with nvme_core.multipath=N, so each controller has its own block
device (with multipath one kernel would merge the two controllers into one device).

The kernel (6.12) before the fix, measured: removing a host from allowed_hosts leaves its
connected controller live; it read and wrote for minutes afterwards, and B saw its writes.

ZVOLT_REVOCATION_LEGACY=1 runs the same checks against the agent with the controller reset
patched out (an unpublish then only removes the allowed_hosts link): they must fail there.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from test_agent_lab import Env, MiB, host_nqn, uniq, wait_ready  # type: ignore[import-not-found]

from lab.guest import SOCKETS, STORAGE_NS, agent_argv

pytestmark = pytest.mark.lab

LEGACY = os.environ.get("ZVOLT_REVOCATION_LEGACY") == "1"
# The agent as it was: an unpublish only unlinks the host (for showing these tests catch that).
LEGACY_AGENT = ("import sys\nfrom agent import nvmet\nnvmet.Subsystem.reset_controllers = lambda self: None\n"
                "from agent.main import main\nsys.exit(main(sys.argv[1:]))")

RECONNECT_DELAY = 2  # s; the node plugin's default is 10 (csi/node.py): B's I/O waits that long
CTRL_LOSS_TMO = 60
# How long the revoked host's first I/O may take to fail, from the unpublish: its controller ends
# during the call, its reconnect RECONNECT_DELAY later is refused with DNR and the host deletes
# it (measured: failed 2.6-5.2 s after the unpublish under TCG); the rest is slack for a busy host.
REVOKE_BOUND = 60.0
# Root-netns side, storage side, addresses: a path the kernel can reconnect over.
RPATH = ("zv-rv", "zv-rvs", "10.46.0.2", "10.46.0.1")
REGION = MiB  # A writes region 0, B region 1; B's background loop works at 8 MiB


@dataclass(frozen=True)
class Attached:
    host: str
    ctrl: str  # nvmeN
    dev: str   # /dev/nvmeNnM: this controller's own block device


FABRICS = """
import os, re, time, json, sys
fd = os.open('/dev/nvme-fabrics', os.O_RDWR)
try:
    os.write(fd, {opts!r}.encode())
    answer = os.read(fd, 4096).decode()
finally:
    os.close(fd)
ctrl = 'nvme' + re.search(r'instance=(\\d+)', answer).group(1)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    disks = [d for d in os.listdir('/sys/class/nvme/' + ctrl) if re.fullmatch(r'nvme\\d+n\\d+', d)]
    if disks:
        print(json.dumps([ctrl, '/dev/' + sorted(disks)[0]])); sys.exit(0)
    time.sleep(0.1)
sys.exit('no namespace on ' + ctrl)
"""

IO = """
import hashlib, mmap, os, random, time, json
dev, off, mib, write, seed = {dev!r}, {off}, {mib}, {write}, {seed}
t0 = time.monotonic()
try:
    fd = os.open(dev, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        h = hashlib.sha256()
        rnd = random.Random(seed)
        for i in range(mib):
            if write:
                buf.seek(0); buf.write(rnd.randbytes(1 << 20))
                assert os.pwritev(fd, [buf], off + (i << 20)) == 1 << 20
            else:
                assert os.preadv(fd, [buf], off + (i << 20)) == 1 << 20
            h.update(buf[:])
        if write:
            os.fsync(fd)
    finally:
        os.close(fd)
    print(json.dumps({{"ok": True, "hash": h.hexdigest(), "s": time.monotonic() - t0}}))
except OSError as e:
    print(json.dumps({{"ok": False, "error": f"{{type(e).__name__}}: {{e}}", "s": time.monotonic() - t0}}))
"""

# B's background I/O: 4 KiB O_DIRECT write + read-back of fresh random data, until told to stop.
LOOP = """
import mmap, os, time, json
dev, off, stop = {dev!r}, {off}, {stop!r}
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
wbuf, rbuf = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
t0 = time.monotonic()
ops = errors = mismatches = 0
worst = worst_at = 0.0
first_error = ""
while not os.path.exists(stop) and time.monotonic() - t0 < 600:
    data = os.urandom(4096)
    wbuf.seek(0); wbuf.write(data)
    pos = off + (ops % 64) * 4096
    s = time.monotonic()
    try:
        os.pwrite(fd, wbuf, pos)
        os.preadv(fd, [rbuf], pos)
        mismatches += rbuf[:] != data
    except OSError as e:
        errors += 1
        first_error = first_error or f"{{s - t0:.1f}}s: {{e}}"
        time.sleep(0.2)
    ops += 1
    d = time.monotonic() - s
    if d > worst:
        worst, worst_at = d, s - t0
    time.sleep(0.02)
os.close(fd)
print(json.dumps({{"ops": ops, "errors": errors, "mismatches": mismatches, "worst_s": worst,
                  "worst_at": worst_at, "first_error": first_error}}))
"""


class Initiators(Env):  # type: ignore[misc]  # Env comes from a test module mypy does not follow
    """Env with initiators in the guest's root netns, any number of host NQNs per subsystem."""

    def __init__(self, lab: Any) -> None:
        super().__init__(lab, initiator_netns=None)

    def attach(self, nqn: str, host: str) -> Attached:
        # Straight to the kernel: nvme-cli 2.3 answers "already connected" to a second host NQN
        # for the same subsystem and address, --duplicate-connect or not.
        opts = (f"transport=tcp,traddr={self.lab.storage_ip},trsvcid=4420,nqn={nqn},hostnqn={host},"
                f"hostid={uuid.uuid4()},reconnect_delay={RECONNECT_DELAY},ctrl_loss_tmo={CTRL_LOSS_TMO}")
        out = self.lab.py(FABRICS.format(opts=opts), timeout=120).stdout
        ctrl, dev = json.loads(out)
        return Attached(host, ctrl, dev)

    def ctrl_state(self, a: Attached) -> str:
        """live / connecting / ... of this controller, or "gone" once the host deleted it."""
        out = self.lab.run(["cat", f"/sys/class/nvme/{a.ctrl}/state", f"/sys/class/nvme/{a.ctrl}/hostnqn"],
                           check=False, timeout=30).stdout.split()
        return out[0] if len(out) == 2 and out[1] == a.host else "gone"

    def detach(self, a: Attached) -> None:
        if self.ctrl_state(a) != "gone":
            self.lab.run(["nvme", "disconnect", "-d", a.ctrl], check=False, timeout=60)

    def io(self, dev: str, region: int, write: bool = False, seed: int = 0, timeout: float = 300) -> dict[str, Any]:
        code = IO.format(dev=dev, off=region * REGION, mib=1, write=write, seed=seed)
        out: dict[str, Any] = json.loads(self.lab.py(code, timeout=timeout).stdout)
        return out

    def ok_hash(self, dev: str, region: int, write: bool = False, seed: int = 0) -> str:
        res = self.io(dev, region, write, seed)
        assert res["ok"], f"{'write' if write else 'read'} on {dev} failed: {res}"
        return str(res["hash"])


class Loop:
    """B's I/O running in the background (a guest process), stopped by a flag file."""

    def __init__(self, env: Initiators, dev: str) -> None:
        self.env = env
        self.stop_file = f"/run/zvolt-revoke-stop-{uuid.uuid4().hex[:8]}"
        self.result: dict[str, Any] = {}
        code = LOOP.format(dev=dev, off=8 * MiB, stop=self.stop_file)

        def run() -> None:
            proc = env.lab.py(code, timeout=900, check=False)
            self.result = json.loads(proc.stdout) if proc.returncode == 0 else {"failed": proc.stderr[-2000:]}

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> dict[str, Any]:
        self.env.lab.run(["touch", self.stop_file])
        self.thread.join(120)
        self.env.lab.run(["rm", "-f", self.stop_file], check=False)
        return self.result


def report(what: str, outcome: str) -> None:
    print(f"\nREVOCATION {what}: {outcome}", flush=True)


@pytest.fixture(scope="module")
def env(lab: Any) -> Iterator[Initiators]:
    multipath = lab.run(["cat", "/sys/module/nvme_core/parameters/multipath"]).stdout.strip()
    if multipath != "N":
        pytest.skip("two initiators in one kernel need nvme_core.multipath=N (each controller its own device)")
    e = Initiators(lab)
    if LEGACY:
        lab.start_service("agent", [agent_argv()[0], "-c", LEGACY_AGENT, *agent_argv()[3:]], netns=STORAGE_NS)
        lab.wait_socket("agent", SOCKETS["agent"])
    else:
        e.restart()
    wait_ready(e.stub)
    dev, peer, mine, theirs = RPATH
    lab.run(["ip", "link", "del", dev], check=False)
    lab.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", STORAGE_NS])
    lab.run(["ip", "addr", "add", f"{mine}/30", "dev", dev])
    lab.run(["ip", "link", "set", dev, "up"])
    lab.run(["ip", "-n", STORAGE_NS, "addr", "add", f"{theirs}/30", "dev", peer])
    lab.run(["ip", "-n", STORAGE_NS, "link", "set", peer, "up"])
    lab.run(["ip", "route", "replace", f"{lab.storage_ip}/32", "via", theirs])
    try:
        yield e
    finally:
        lab.run(["ip", "link", "del", dev], check=False)  # its peer and the route go with it
        if LEGACY:
            e.restart()  # the other modules expect the agent as built
            wait_ready(e.stub)
        e.channel.close()


def test_unpublished_host_loses_io_on_a_shared_subsystem_and_the_other_keeps_working(env: Initiators) -> None:
    A, B = host_nqn(), host_nqn()
    vol = env.create(uniq("revoke"), 64 * MiB)
    nqn = env.publish(vol.id, A).nqn
    assert env.publish(vol.id, B).nqn == nqn and sorted(env.allowed(nqn)) == sorted([A, B])
    attached: list[Attached] = []
    loop: Loop | None = None
    try:
        a = env.attach(nqn, A)
        attached.append(a)
        b = env.attach(nqn, B)
        attached.append(b)
        # Both hosts read and write the one volume.
        a_data = env.ok_hash(a.dev, 0, write=True, seed=1)
        assert env.ok_hash(b.dev, 0) == a_data
        b_data = env.ok_hash(b.dev, 1, write=True, seed=2)
        assert env.ok_hash(a.dev, 1) == b_data

        loop = Loop(env, b.dev)
        time.sleep(3)  # B's loop is running before the unpublish
        start = time.monotonic()
        env.unpublish(vol.id, A)
        unpublish_s = time.monotonic() - start
        assert env.allowed(nqn) == [B]

        # A's very next read and write fail (held until its reconnect is refused, then an error).
        read = env.io(a.dev, 0, timeout=REVOKE_BOUND + 60)
        read_s = time.monotonic() - start
        assert not read["ok"], f"host A still reads the volume {read_s:.1f}s after UnpublishVolume: {read}"
        write = env.io(a.dev, 0, write=True, seed=3, timeout=REVOKE_BOUND + 60)
        write_s = time.monotonic() - start
        assert not write["ok"], f"host A still writes the volume {write_s:.1f}s after UnpublishVolume: {write}"
        assert read_s < REVOKE_BOUND, f"A's read failed only {read_s:.1f}s after the unpublish"
        deadline = time.monotonic() + 30
        while env.ctrl_state(a) != "gone" and time.monotonic() < deadline:
            time.sleep(0.5)
        a_state = env.ctrl_state(a)
        assert a_state == "gone", f"A's controller is {a_state!r}: its host should have deleted it"

        # Nothing A tried landed, now or a little later; B worked throughout, never saw an error.
        assert env.ok_hash(b.dev, 0) == a_data
        time.sleep(5)
        assert env.ok_hash(b.dev, 0) == a_data
        b_loop = loop.stop()
        loop = None
        assert b_loop.get("ops", 0) > 0 and b_loop["errors"] == 0 and b_loop["mismatches"] == 0, b_loop
        assert env.ctrl_state(b) == "live"
        assert env.ok_hash(b.dev, 1) == b_data  # same controller, same block device
        b_data = env.ok_hash(b.dev, 1, write=True, seed=4)
        report("shared subsystem, one of two hosts unpublished",
               f"unpublish {unpublish_s:.1f}s; A's next read failed at +{read_s:.1f}s ({read['error']}), "
               f"its write at +{write_s:.1f}s ({write['error']}), controller gone; B: {b_loop['ops']} I/Os, "
               f"0 errors, longest {b_loop['worst_s']:.1f}s (its reconnect, reconnect_delay {RECONNECT_DELAY}s)")

        # Published again, A is back on the same volume, and sees B's data.
        env.detach(a)
        attached.remove(a)
        assert env.publish(vol.id, A).nqn == nqn
        a = env.attach(nqn, A)
        attached.append(a)
        assert env.ok_hash(a.dev, 1) == b_data
        a_data = env.ok_hash(a.dev, 0, write=True, seed=5)
        assert env.ok_hash(b.dev, 0) == a_data
    finally:
        if loop is not None:
            loop.stop()
        for att in attached:
            env.detach(att)
    env.unpublish(vol.id, A)
    env.unpublish(vol.id, B)
    assert nqn not in env.subsystems() and A not in env.hosts() and B not in env.hosts()
    env.delete(vol.id)


def test_unpublishing_the_only_host_ends_its_io(env: Initiators) -> None:
    """The last host: the subsystem is deleted, and unlinking it from the port ends its controllers.

    Another export stays on the port, as on any busy node: the host's reconnect is then refused
    at once ("invalid subsystem", DNR). Measured here without one: nvmet closes a port's listener
    with its last subsystem, the host's reconnects are refused by TCP (ECONNREFUSED) and its I/O is
    held, never served, until ctrl_loss_tmo ends the controller (61 s with ctrl_loss_tmo 60)."""
    A, other = host_nqn(), host_nqn()
    vol = env.create(uniq("revoke-one"), 64 * MiB)
    neighbour = env.create(uniq("revoke-nb"), 64 * MiB)
    nqn = env.publish(vol.id, A).nqn
    env.publish(neighbour.id, other)
    attached: list[Attached] = []
    try:
        a = env.attach(nqn, A)
        attached.append(a)
        a_data = env.ok_hash(a.dev, 0, write=True, seed=1)
        start = time.monotonic()
        env.unpublish(vol.id, A)
        assert nqn not in env.subsystems()
        read = env.io(a.dev, 0, timeout=REVOKE_BOUND + 60)
        read_s = time.monotonic() - start
        assert not read["ok"], f"host A still reads {read_s:.1f}s after UnpublishVolume: {read}"
        assert read_s < REVOKE_BOUND, f"A's read failed only {read_s:.1f}s after the unpublish"
        report("the only host unpublished", f"A's next read failed at +{read_s:.1f}s ({read['error']})")
    finally:
        for att in attached:
            env.detach(att)
    # Its data is intact for the next publish.
    again = Attached(A, "", "")
    try:
        env.publish(vol.id, A)
        again = env.attach(nqn, A)
        assert env.ok_hash(again.dev, 0) == a_data
    finally:
        if again.ctrl:
            env.detach(again)
    env.unpublish(vol.id, A)
    env.unpublish(neighbour.id, other)
    env.delete(vol.id)
    env.delete(neighbour.id)
