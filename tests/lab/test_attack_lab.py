"""Attack tests: a hostile pod speaks NVMe/TCP from user space (tests/lab/nvme_tcp.py).

The attacker stands in for a tenant pod: it runs as `nobody` (uid 65534, no capabilities, no
new privileges) in its own network namespace `zvpod` (10.43.0.2), routed through the worker
netns to the storage target 10.42.0.1:4420, the way a pod's traffic leaves a worker node. It
can read what a pod can read of the host: sysfs (`/sys/class/nvme/*`), nothing root-only.

The guard (issue 12): the node plugin, started in the worker netns as the lab starts it
(`--storage-network 10.42.0.0/24 --nvme-port 4420,4421`), installs the nftables table
`inet zvolt_guard_worker` (zvolt/nftguard.py) that drops what the worker forwards to the
storage network's NVMe/TCP ports (clear-text and TLS). "Guard off" = no node plugin and no table: the weakened
network that the first half of these tests attacks.

Guard off (what a pod gets when the network lets it through):
  a. a weakened target (allow_any_host=1): the tool reads the test's pattern, so the tool works
     (and with the guard on, the same tool cannot even open TCP to that open target);
  b. a random host NQN against a published volume: Connect refused (Connect Invalid Host);
  c. the worker's host NQN, borrowed from sysfs, DH-HMAC-CHAP off: the pod reads the volume
     (a FINDING test: it documents what the target alone allows);
  d. the same with the agent's `--dhchap` and `--dhchap-bidirectional`: refused without the
     secret (and with a wrong one); and a FINDING test: sysfs shows an unprivileged reader the
     secret (`dhchap_secret` is 0644 on 6.12), and the pod reads the volume with it.
Guard on:
  e. in every configuration (DH-HMAC-CHAP off, `--dhchap`, `--dhchap-bidirectional`) the pod,
     holding everything sysfs gives it, cannot open TCP to the target; the worker's own kernel
     initiator connects and reads through the guard; the rule's counter shows the drops; with
     the guard removed the very same attack reads the volume (so the block is the guard's);
  f. a flushed ruleset is put back by the node plugin's keeper;
  g. the agent with `--storage-network 10.42.0.0/24` alone listens on 10.42.0.1 (the storage
     netns' one address in it) and its own guard (`input`) drops the pod even with the worker's
     guard off, while the worker's initiator (10.42.0.2, inside the network) still connects.

Run with `-s` to see the observed outcomes (`ATTACK ...` lines).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_agent_lab import CONFIGFS, Env, MiB, agent_session, host_nqn, uniq, wait_ready  # type: ignore[import-not-found]

from agent.dhchap import generate_secret
from lab.guest import NVME_TLS_PORT, SOCKETS, STORAGE_NETWORK, STORAGE_NS, WORKER_NS, agent_argv
from zvolt.commands import Result, Runner
from zvolt.names import volume_host_id, volume_host_nqn
from zvolt.nft import Nft
from zvolt.nftguard import Observed, Role, guard_spec, guarded_ports, observe, ruleset
from zvolt.storagenet import MOVE_PORT

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
# What the lab's node plugin and a `--storage-network` agent write (the module's own rules).
WORKER_RULES = ruleset(guard_spec(Role.WORKER, STORAGE_NETWORK, guarded_ports([PORT, NVME_TLS_PORT])))
STORAGE_RULES = ruleset(guard_spec(Role.STORAGE, STORAGE_NETWORK, guarded_ports([PORT, NVME_TLS_PORT])))
# A dropped SYN is retried until the client gives up: the pod's tool waits this long.
BLOCKED_TIMEOUT = 8.0
GUARD_INTERVAL = "2"  # seconds between the keeper's checks (30 in production)


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
             trsvcid: str = PORT, ignore_authreq: bool = False, secret: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        args = ["read", "--traddr", traddr, "--trsvcid", trsvcid, "--subnqn", subnqn, "--hostnqn", hostnqn,
                "--length", str(BLOCK), "--timeout", str(timeout)]
        if hostid:
            args += ["--hostid", hostid]
        if ignore_authreq:
            args.append("--ignore-authreq")
        if secret:
            args += ["--dhchap-secret", secret]  # argv of a process in the pod's own pid view
        return self._run(*args)

    def discover(self, hostnqn: str, timeout: float = 30.0) -> dict[str, Any]:
        return self._run("discover", "--traddr", "10.42.0.1", "--trsvcid", PORT, "--hostnqn", hostnqn,
                         "--timeout", str(timeout))

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


def guest_runner(lab: Any, netns: str) -> Runner:
    """zvolt's own nft adapter, run in a guest netns: the production code reads the guest kernel."""

    def run(argv: Any, *, stdin: str | None = None, timeout: float = 30.0) -> Result:
        proc = lab.run(list(argv), netns=netns, check=False, timeout=timeout, input=stdin)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


@dataclass
class Guard:
    """The worker's guard as the node plugin installs it, switched on and off."""

    lab: Any

    def nft(self, netns: str = WORKER_NS) -> Nft:
        return Nft(guest_runner(self.lab, netns))

    def seen(self) -> Observed | None:
        listing = self.nft().list_table(WORKER_RULES.family, WORKER_RULES.table)
        return None if listing is None else observe(listing, WORKER_RULES)

    def on(self) -> Observed:
        """The real node plugin in the worker netns, as the lab starts it: it applies the guard
        before it serves, so its socket answering means the table is in place."""
        seen = self.seen()
        if self.lab.service_running("node") and seen is not None and seen.fingerprint == WORKER_RULES.expected():
            return seen
        t0 = time.monotonic()
        self.lab.start_node("--guard-interval", GUARD_INTERVAL)
        seen = self.seen()
        assert seen is not None and seen.fingerprint == WORKER_RULES.expected(), seen
        report("guard on", f"node plugin started, table {WORKER_RULES.table} in place ({time.monotonic() - t0:.1f} s)")
        return seen

    def off(self) -> None:
        """No node plugin, no table (the plugin leaves its rules on exit, so remove them)."""
        self.lab.stop_service("node")
        self.lab.run(["nft", "delete", "table", WORKER_RULES.family, WORKER_RULES.table], netns=WORKER_NS,
                     check=False, timeout=30)
        assert self.seen() is None


def blocked(res: dict[str, Any]) -> None:
    """TCP itself never got through: no NVMe step was reached, nothing was read."""
    assert res["ok"] is False and "data" not in res, res
    assert res["kind"] == "TransportError" and res["step"] == "tcp connect qid 0", res
    assert "timed out" in res["error"], res


@pytest.fixture(scope="module")
def guard(lab: Any) -> Iterator[Guard]:
    was_running = lab.service_running("node")
    g = Guard(lab)
    g.off()  # every test says which state it needs
    try:
        yield g
    finally:
        if was_running:
            g.on()


@pytest.fixture(scope="module")
def env(lab: Any) -> Iterator[Env]:
    with agent_session(lab, restore=True) as e:
        yield e


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


def read_block0(env: Env, dev: str, netns: str | None = "worker") -> bytes:
    code = f"""
import mmap, os
fd = os.open({dev!r}, os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, {BLOCK})
assert os.preadv(fd, [buf], 0) == {BLOCK}
os.close(fd)
print(bytes(buf).hex())
"""
    return bytes.fromhex(env.lab.py(code, netns=netns, timeout=T).stdout.strip())  # type: ignore[attr-defined]


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


def test_weakened_target_allow_any_host_is_read_by_the_attack_tool(env: Env, attacker: Attacker, guard: Guard) -> None:
    """(a) The control: with allow_any_host=1 and the guard off a stranger reads block 0, so the
    tool is not broken. With the guard on, the same open target is out of the pod's reach."""
    guard.off()
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

        guard.on()
        t0 = time.monotonic()
        res = attacker.read(pub.nqn, stranger, timeout=BLOCKED_TIMEOUT)
        report("a weakened target, guard on", {k: res.get(k) for k in ("ok", "kind", "step", "error")}
               | {"seconds": round(time.monotonic() - t0, 1)})
        blocked(res)
    finally:
        env.lab.py(f"open({sub + '/attr_allow_any_host'!r}, 'w').write('0')")  # type: ignore[attr-defined]
        env.lab.run(["ln", "-sfn", f"{CONFIGFS}/hosts/{host}", f"{sub}/allowed_hosts/{host}"],  # type: ignore
                    check=False)
        cleanup(env, vol, pub.nqn, host)


def test_random_host_nqn_is_refused_at_connect(env: Env, attacker: Attacker, guard: Guard) -> None:
    """(b) Guard off. A host NQN the volume is not published to: Connect Invalid Host, no data."""
    guard.off()
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


def test_guard_off_borrowed_hostnqn_without_dhchap_reads_data_FINDING(env: Env, attacker: Attacker,
                                                                      guard: Guard) -> None:
    """(c) FINDING, guard off (agent default, no DH-HMAC-CHAP): a pod that reads the worker's
    host NQN (and host ID) from sysfs connects with it and reads the volume.

    This asserts what the target alone allows, so that a change in it is noticed; it is why the
    network must keep pods away (SECURITY.md: a host NQN is an identifier, not a secret)."""
    guard.off()
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
    host: str  # the NQN the worker connects with: per volume when DH-HMAC-CHAP is on
    hostid: str
    data: bytes
    key: str = ""  # the volume's keys, as the controller takes them from its Secret
    ctrl_key: str = ""

    def kernel_auth(self) -> list[str]:
        auth = ["--dhchap-secret", self.key] if self.key else []
        if self.ctrl_key:
            auth += ["--dhchap-ctrl-secret", self.ctrl_key]
        return auth


AUTH_MODES = ["no-auth", "--dhchap", "--dhchap-bidirectional"]
DHCHAP_MODES = AUTH_MODES[1:]


@pytest.fixture(scope="module")
def auth_volume(request: pytest.FixtureRequest, env: Env) -> Iterator[AuthVolume]:
    """The agent in one DH-HMAC-CHAP mode (`request.param`, one of AUTH_MODES); a volume
    published to a worker host NQN with the volume's keys (as the controller does), connected by
    the worker's kernel initiator as the node plugin does, block 0 holding a pattern."""
    mode = str(request.param)
    env.restart(*([] if mode == "no-auth" else [mode]))
    wait_ready(env.stub)
    node = host_nqn()
    key = generate_secret() if mode != "no-auth" else ""
    ctrl_key = generate_secret() if mode == "--dhchap-bidirectional" else ""
    vol = env.create(uniq("auth"), 64 * MiB)
    pub = env.publish(vol.id, node, key, ctrl_key)
    host = pub.host_nqn
    hostid = volume_host_id(node, vol.id) if key else str(uuid.uuid4())
    try:
        assert (host == volume_host_nqn(node, vol.id)) == bool(key) and env.allowed(pub.nqn) == [host]
        v = AuthVolume(mode, pub, host, hostid, pattern("auth"), key, ctrl_key)
        kernel_connect(env, pub.nqn, host, hostid, *v.kernel_auth())
        write_block0(env, env.device_for(pub.nqn), v.data)
        yield v
    finally:
        env.disconnect(pub.nqn)
        with contextlib.suppress(grpc.RpcError):
            env.unpublish(vol.id, node)
        env.delete(vol.id)
        assert pub.nqn not in env.subsystems() and host not in env.hosts()
        env.restart()
        wait_ready(env.stub)


@pytest.mark.parametrize("auth_volume", DHCHAP_MODES, indirect=True)
def test_guard_off_borrowed_hostnqn_with_dhchap_is_refused(attacker: Attacker, guard: Guard,
                                                           auth_volume: AuthVolume) -> None:
    """(d) Guard off, DH-HMAC-CHAP on: the borrowed host NQN (and host ID) without the secret
    gets no data."""
    guard.off()
    v = auth_volume
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
    # The target answers AUTH_Failure1 (reason 0x1, explanation 0x1); under load it was once seen
    # to close the connection at that step instead (CI here, 2026-12-06). Refused either way.
    failed = wrong["kind"] == "AuthenticationFailed" and "authentication failed (reason 0x1, explanation 0x1)" in (
        wrong["error"])
    dropped = wrong["kind"] == "TransportError" and wrong["step"] == "DH-HMAC-CHAP qid 0 Success1" and (
        "closed the connection" in wrong["error"])
    assert failed or dropped, wrong


@pytest.mark.parametrize("auth_volume", DHCHAP_MODES, indirect=True)
def test_guard_off_dhchap_secret_readable_in_sysfs_lets_a_pod_read_data_FINDING(attacker: Attacker, guard: Guard,
                                                                                auth_volume: AuthVolume) -> None:
    """(d) FINDING, guard off, on the lab kernel (6.12): the kernel initiator's
    /sys/class/nvme/nvmeX/dhchap_secret (and dhchap_ctrl_secret) are mode 0644 and show the
    secret in clear to any user. A pod that reads host sysfs therefore holds the worker's
    DH-HMAC-CHAP secret and passes authentication; bidirectional mode does not help, since
    asking the controller to authenticate itself is the host's choice.

    This asserts what the target alone allows so that a change is noticed: DH-HMAC-CHAP is not
    enough on its own, which is why the guard keeps pods off the network path (e below)."""
    guard.off()
    v = auth_volume
    seen = attacker.sysfs_for(v.pub.nqn)
    report(f"d {v.mode} sysfs as nobody",
           {a: seen[a] for a in ("hostnqn", "hostid", "dhchap_secret", "dhchap_ctrl_secret")})
    assert seen["dhchap_secret"] == {"mode": "0o644", "value": v.key}
    ctrl_secret = v.ctrl_key if v.mode == "--dhchap-bidirectional" else "none"
    assert seen["dhchap_ctrl_secret"] == {"mode": "0o644", "value": ctrl_secret}

    res = attacker.read(v.pub.nqn, seen["hostnqn"]["value"], seen["hostid"]["value"],
                        secret=seen["dhchap_secret"]["value"])
    report(f"d {v.mode} borrowed NQN + secret from sysfs", {k: res.get(k) for k in ("ok", "cntlid", "log", "error")})
    assert res["ok"] is True, res
    assert bytes.fromhex(res["data"]) == v.data, "the pod read the worker's volume through DH-HMAC-CHAP"


# -- the guard on -----------------------------------------------------------------------------------


@pytest.mark.parametrize("auth_volume", AUTH_MODES, indirect=True)
def test_guard_on_the_pod_cannot_connect_in_any_auth_mode(env: Env, attacker: Attacker, guard: Guard,
                                                          auth_volume: AuthVolume) -> None:
    """(e) The node plugin's guard in the worker netns: the pod, holding the host NQN, host ID and
    (with DH-HMAC-CHAP) the secret from sysfs, cannot open TCP to the target; the worker's own
    kernel initiator connects and reads; removing the guard lets the very same attack through."""
    v = auth_volume
    before = guard.on()

    # The worker's kernel initiator goes through `output`, which the guard leaves alone.
    env.disconnect(v.pub.nqn)
    t0 = time.monotonic()
    kernel_connect(env, v.pub.nqn, v.host, v.hostid, *v.kernel_auth())
    assert read_block0(env, env.device_for(v.pub.nqn)) == v.data
    report(f"e {v.mode} guard on, worker kernel initiator",
           f"connected and read block 0 ({time.monotonic() - t0:.1f} s)")

    seen = attacker.sysfs_for(v.pub.nqn)
    stolen_host, stolen_id = seen["hostnqn"]["value"], seen["hostid"]["value"]
    assert (stolen_host, stolen_id) == (v.host, v.hostid)
    secret = None
    if v.mode != "no-auth":
        secret = seen["dhchap_secret"]["value"]
        assert secret == v.key  # the pod holds the secret: only the network stops it
    t0 = time.monotonic()
    res = attacker.read(v.pub.nqn, stolen_host, stolen_id, secret=secret, timeout=BLOCKED_TIMEOUT)
    report(f"e {v.mode} guard on, pod with everything sysfs shows",
           {k: res.get(k) for k in ("ok", "kind", "step", "error")} | {"seconds": round(time.monotonic() - t0, 1)})
    blocked(res)
    disc = attacker.discover(stolen_host, timeout=BLOCKED_TIMEOUT)
    report(f"e {v.mode} guard on, discovery", {k: disc.get(k) for k in ("ok", "kind", "step", "error")})
    blocked(disc)
    after = guard.seen()
    assert after is not None and after.dropped_packets > before.dropped_packets, (before, after)
    report(f"e {v.mode} guard on, rule counter", f"{before.dropped_packets} -> {after.dropped_packets} packets dropped")

    # The control: the guard removed, the same attack reads the worker's volume.
    guard.off()
    res = attacker.read(v.pub.nqn, stolen_host, stolen_id, secret=secret)
    report(f"e {v.mode} guard removed, same attack", {k: res.get(k) for k in ("ok", "cntlid", "error")})
    assert res["ok"] is True and bytes.fromhex(res["data"]) == v.data, res


def pod_tcp_connect(lab: Any, port: int, timeout: float) -> str:
    """A bare TCP connect from the pod, as nobody: 'connected', 'refused' or 'timed out'."""
    code = (f"import socket\n"
            f"try:\n    socket.create_connection(('10.42.0.1', {port}), timeout={timeout}).close()\n"
            f"    print('connected')\n"
            f"except ConnectionRefusedError:\n    print('refused')\n"
            f"except TimeoutError:\n    print('timed out')\n")
    proc = lab.run([*UNPRIVILEGED, lab.python, "-c", code], netns=POD_NS, check=False, timeout=timeout + 60)
    return str(proc.stdout.strip() or proc.stderr.strip())


def test_guard_keeps_the_pod_off_the_agents_move_port(env: Env, attacker: Attacker, guard: Guard) -> None:
    """The agents' move port streams whole volumes between storage nodes. A one-time token and TLS
    guard the stream; the port itself is the guard's to keep from pods, like NVMe/TCP. With the
    worker's guard on the pod's SYN is dropped; with it off the same connect reaches the agent."""
    guard.on()
    t0 = time.monotonic()
    outcome = pod_tcp_connect(env.lab, MOVE_PORT, BLOCKED_TIMEOUT)  # type: ignore[attr-defined]
    report("move port, guard on", f"{outcome} ({time.monotonic() - t0:.1f} s)")
    assert outcome == "timed out"
    guard.off()
    outcome = pod_tcp_connect(env.lab, MOVE_PORT, 30.0)  # type: ignore[attr-defined]
    report("move port, guard removed", outcome)
    assert outcome == "connected"


def test_guard_is_put_back_after_a_flush(env: Env, attacker: Attacker, guard: Guard) -> None:
    """(f) Someone flushes the worker's ruleset, or empties the guard's table: the node plugin's
    keeper (checking every GUARD_INTERVAL s here, 30 s by default) puts it back and says so."""
    guard.on()
    for what, argv, word in (
        ("nft flush ruleset", ["nft", "flush", "ruleset"], "missing"),
        ("nft flush table", ["nft", "flush", "table", WORKER_RULES.family, WORKER_RULES.table], "changed"),
    ):
        line = f"NVMe/TCP guard was {word}: re-applying"
        logged = env.lab.service_log("node", 1000).count(line)  # type: ignore[attr-defined]
        env.lab.run(argv, netns=WORKER_NS, timeout=30)  # type: ignore[attr-defined]
        # The keeper may put the guard back before a listing here could see it gone (CI saw
        # that); its log line is the proof that it found the guard missing or changed.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            seen = guard.seen()
            said = env.lab.service_log("node", 1000).count(line)  # type: ignore[attr-defined]
            if seen is not None and seen.fingerprint == WORKER_RULES.expected() and said > logged:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"guard not re-applied after {what}:\n{env.lab.service_log('node', 60)}")  # type: ignore
        back = time.monotonic() - t0
        assert said == logged + 1
        res = attacker.discover(host_nqn(), timeout=BLOCKED_TIMEOUT)
        report(f"f after {what}", f"re-applied within {back:.1f} s, logged; pod: {res.get('kind')} "
                                  f"at {res.get('step')}")
        blocked(res)


def test_agent_listens_on_its_storage_network_address_and_guards_input(env: Env, attacker: Attacker,
                                                                       guard: Guard) -> None:
    """(g) The agent given only `--storage-network 10.42.0.0/24` listens on the storage netns'
    one address in it (10.42.0.1) and installs its own guard: with the worker's guard off, the
    pod (source 10.43.0.2) is dropped at the storage node's `input`, while the worker's kernel
    initiator (10.42.0.2, inside the network) connects and reads."""
    guard.off()
    argv = agent_argv()
    i = argv.index("--nvme-listen")
    del argv[i:i + 2]
    argv += ["--storage-network", STORAGE_NETWORK, "--guard-interval", GUARD_INTERVAL]
    storage_nft = guard.nft(STORAGE_NS)
    host, hostid = host_nqn(), str(uuid.uuid4())
    vol = pub = None
    try:
        env.lab.start_service("agent", argv, netns=STORAGE_NS)  # type: ignore[attr-defined]
        env.lab.wait_socket("agent", SOCKETS["agent"])  # type: ignore[attr-defined]
        wait_ready(env.stub)
        log = env.lab.service_log("agent", 200)  # type: ignore[attr-defined]
        assert '"nvme_listen": "10.42.0.1:4420"' in log and '"event": "guard_installed"' in log, log
        listing = storage_nft.list_table(STORAGE_RULES.family, STORAGE_RULES.table)
        assert listing is not None
        before = observe(listing, STORAGE_RULES)
        assert before.fingerprint == STORAGE_RULES.expected()

        vol, pub = published(env, "storage-guard", host)
        ports = env.lab.py(  # type: ignore[attr-defined]
            "from agent import nvmet\n"
            "for p in nvmet.Root().ports():\n"
            f"    print(p.traddr, {pub.nqn!r} in p.subsystems())\n"
        ).stdout.splitlines()
        report("g agent with --storage-network", {"address": pub.address, "port": pub.port, "configfs ports": ports})
        assert (pub.address, pub.port) == ("10.42.0.1", PORT)
        assert "10.42.0.1 True" in ports

        data = pattern("sguard")
        kernel_connect(env, pub.nqn, host, hostid)
        write_block0(env, env.device_for(pub.nqn), data)
        assert read_block0(env, env.device_for(pub.nqn)) == data

        res = attacker.read(pub.nqn, host, hostid, timeout=BLOCKED_TIMEOUT)
        report("g storage guard only, pod with the borrowed NQN",
               {k: res.get(k) for k in ("ok", "kind", "step", "error")})
        blocked(res)
        listing = storage_nft.list_table(STORAGE_RULES.family, STORAGE_RULES.table)
        assert listing is not None
        after = observe(listing, STORAGE_RULES)
        assert after.dropped_packets > before.dropped_packets
        report("g storage guard counter", f"{before.dropped_packets} -> {after.dropped_packets} packets dropped")
    finally:
        if vol is not None and pub is not None:
            cleanup(env, vol, pub.nqn, host)
        env.restart()  # the standard agent (--nvme-listen, no guard) for whoever comes next
        wait_ready(env.stub)
        # The agent leaves its rules on exit (the safe default); the lab's other tests connect
        # from sources outside 10.42.0.0/24 (the fault suite's root-netns initiator), so go.
        env.lab.run(["nft", "delete", "table", STORAGE_RULES.family, STORAGE_RULES.table],  # type: ignore
                    netns=STORAGE_NS, check=False, timeout=30)
        assert storage_nft.list_table(STORAGE_RULES.family, STORAGE_RULES.table) is None
