"""Who may connect, on the real stack: nvmet allow-lists and DH-HMAC-CHAP in the kernel.

The agent runs in the storage netns, `nvme connect` / the CSI node plugin in the worker netns.
Every test restarts the agent with the flags it needs and the module leaves it running with
the standard flags again.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from test_agent_lab import CONFIGFS, Env, MiB, agent_session, host_nqn, uniq, wait_ready  # type: ignore[import-not-found]
from test_csi_lab import WRITE, Csi, mount_cap  # type: ignore[import-not-found]

from agent.dhchap import decode_secret, generate_secret
from zvolt.names import dhchap_secret_name, volume_host_id, volume_host_nqn
from zvolt.pb import csi_pb2

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def env(lab: Any) -> Iterator[Env]:
    with agent_session(lab, fresh=False, restore=True) as e:
        yield e


def connect(env: Env, nqn: str, host: str, *auth: str) -> subprocess.CompletedProcess[str]:
    argv = ["nvme", "connect", "-t", "tcp", "-a", env.lab.storage_ip, "-s", "4420", "-n", nqn, "--hostnqn", host,
            "--reconnect-delay", "1", "--ctrl-loss-tmo", "30", *auth]
    return env.lab.run(argv, netns="worker", check=False, timeout=120)  # type: ignore[no-any-return]


def connected(env: Env, nqn: str) -> bool:
    code = f"""
import glob
print(any(open(p).read().strip() == {nqn!r} for p in glob.glob('/sys/class/nvme/nvme*/subsysnqn')))
"""
    return env.lab.py(code, netns="worker").stdout.strip() == "True"  # type: ignore[no-any-return]


def host_attr(env: Env, host: str, attr: str) -> str:
    return str(env.lab.run(["cat", f"{CONFIGFS}/hosts/{host}/{attr}"]).stdout.strip())


def refused(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, f"connect should have been refused: {proc.stdout} {proc.stderr}"
    return proc.stdout + proc.stderr


def kernel_log(env: Env) -> list[str]:
    return env.lab.run(["dmesg"]).stdout.splitlines()  # type: ignore[no-any-return]


def key_rejected(env: Env, attempt: Callable[[], subprocess.CompletedProcess[str]]) -> None:
    """The kernel refused the connect for its key. nvme-cli says so when the host gets
    EKEYREJECTED; a CI run under load got EIO for the same wrong key instead, so then the guest's
    kernel log must name the failed authentication (and not, say, an unreachable port)."""
    before = len(kernel_log(env))
    said = refused(attempt())
    since = kernel_log(env)[before:]
    logged = [line for line in since if "authentication failed" in line]
    print(f"wrong key: {said.strip()!r}; kernel: {logged}", flush=True)
    assert "Key was rejected" in said or logged, f"{said}\nkernel log: {since}"


def test_allow_list_is_enforced_and_repaired_on_restart(env: Env) -> None:
    env.restart()
    wait_ready(env.stub)
    a, b, stranger = host_nqn(), host_nqn(), host_nqn()
    vol = env.create(uniq("acl2"), 64 * MiB)
    nqn = env.publish(vol.id, a).nqn
    env.publish(vol.id, b)
    try:
        assert env.lab.run(["cat", f"{CONFIGFS}/subsystems/{nqn}/attr_allow_any_host"]).stdout.strip() == "0"
        assert sorted(env.allowed(nqn)) == sorted([a, b])
        out = refused(connect(env, nqn, stranger))
        assert not connected(env, nqn), out
        # A host that was unpublished loses access at once, even though it was allowed before.
        env.unpublish(vol.id, a)
        refused(connect(env, nqn, a))
        # Someone tampers with the target behind the agent's back (the kernel only takes
        # allow_any_host=1 once the allow-list is empty): now anyone may connect...
        env.lab.run(["rm", f"{CONFIGFS}/subsystems/{nqn}/allowed_hosts/{b}"])
        any_host = f"{CONFIGFS}/subsystems/{nqn}/attr_allow_any_host"
        env.lab.py(f"open({any_host!r}, 'w').write('1')")
        assert connect(env, nqn, stranger).returncode == 0 and connected(env, nqn)
        env.disconnect(nqn)
        # ...until the agent restarts (as after any crash or reboot): policy is put back.
        env.restart()
        wait_ready(env.stub)
        assert env.lab.run(["cat", f"{CONFIGFS}/subsystems/{nqn}/attr_allow_any_host"]).stdout.strip() == "0"
        assert env.allowed(nqn) == [b]
        refused(connect(env, nqn, stranger))
        proc = connect(env, nqn, b)
        assert proc.returncode == 0, proc.stderr
    finally:
        env.disconnect(nqn)
    env.unpublish(vol.id, b)
    env.delete(vol.id)
    assert stranger not in env.hosts() and a not in env.hosts() and b not in env.hosts()


def test_dhchap_a_volumes_key_opens_that_volume_only(env: Env) -> None:
    """The agent with --dhchap: a publish without keys is refused; with the volume's key the node
    is allowed under its NQN for that volume, which connects with that key and nothing else (no
    key, a wrong key, the node's own NQN, another volume's NQN: all refused by the kernel)."""
    env.restart("--dhchap")
    wait_ready(env.stub)
    node = host_nqn()
    vol, other = env.create(uniq("auth"), 64 * MiB), env.create(uniq("auth-b"), 64 * MiB)
    with pytest.raises(grpc.RpcError) as err:
        env.publish(vol.id, node)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--dhchap" in (err.value.details() or "")
    key, other_key = generate_secret(), generate_secret()
    pub = env.publish(vol.id, node, key)
    pub_other = env.publish(other.id, node, other_key)
    host, hostid = pub.host_nqn, volume_host_id(node, vol.id)
    try:
        assert host == volume_host_nqn(node, vol.id) and env.allowed(pub.nqn) == [host]
        assert env.allowed(pub_other.nqn) == [volume_host_nqn(node, other.id)]
        assert host_attr(env, host, "dhchap_key") == key and decode_secret(key)[0] == 1
        assert host_attr(env, host, "dhchap_hash") == "hmac(sha256)"
        assert env.lab.run(["stat", "-c", "%a", f"/var/lib/zvolt/dhchap/{host}.json"]).stdout.strip() == "600"

        none = refused(connect(env, pub.nqn, host, "--hostid", hostid))
        assert "Required key not available" in none or "key" in none.lower(), none
        key_rejected(env, lambda: connect(env, pub.nqn, host, "--hostid", hostid, "--dhchap-secret", generate_secret()))
        refused(connect(env, pub.nqn, node, "--dhchap-secret", key))  # the node's own NQN is not allowed
        # This volume's NQN and key on the other volume: not allowed there (a key opens one volume).
        refused(connect(env, pub_other.nqn, host, "--hostid", hostid, "--dhchap-secret", key))
        assert not connected(env, pub.nqn) and not connected(env, pub_other.nqn)

        ok = connect(env, pub.nqn, host, "--hostid", hostid, "--dhchap-secret", key)
        assert ok.returncode == 0, ok.stderr
        dev = env.device_for(pub.nqn)
        written = env.write(dev, seed=5, mib=2)
        assert env.read_hash(dev, mib=2) == written
    finally:
        env.disconnect(pub.nqn)
    # The key survives an agent restart (persisted) and is restored into the empty host entry.
    env.restart("--dhchap")
    wait_ready(env.stub)
    assert host_attr(env, host, "dhchap_key") == key and env.allowed(pub.nqn) == [host]
    for v in (vol, other):
        env.unpublish(v.id, node)
        env.delete(v.id)
    assert host not in env.hosts() and volume_host_nqn(node, other.id) not in env.hosts()
    assert not env.lab.run(["ls", "/var/lib/zvolt/dhchap"]).stdout.split()


def test_dhchap_bidirectional_controller_key(env: Env) -> None:
    env.restart("--dhchap-bidirectional")
    wait_ready(env.stub)
    node = host_nqn()
    vol = env.create(uniq("auth2"), 64 * MiB)
    key, ctrl_key = generate_secret(), generate_secret()
    with pytest.raises(grpc.RpcError) as err:
        env.publish(vol.id, node, key)  # bidirectional required: a publish without the controller key
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    pub = env.publish(vol.id, node, key, ctrl_key)
    host, hostid = pub.host_nqn, volume_host_id(node, vol.id)
    try:
        assert host_attr(env, host, "dhchap_ctrl_key") == ctrl_key
        # The host checks the target too: a target that cannot prove the controller key is refused.
        bad = refused(connect(env, pub.nqn, host, "--hostid", hostid, "--dhchap-secret", key,
                              "--dhchap-ctrl-secret", generate_secret()))
        assert not connected(env, pub.nqn), bad
        ok = connect(env, pub.nqn, host, "--hostid", hostid, "--dhchap-secret", key, "--dhchap-ctrl-secret", ctrl_key)
        assert ok.returncode == 0, ok.stderr
        assert env.device_for(pub.nqn).startswith("/dev/nvme")
    finally:
        env.disconnect(pub.nqn)
    env.unpublish(vol.id, node)
    env.delete(vol.id)


def test_csi_attach_with_dhchap_end_to_end_and_no_key_in_logs(env: Env) -> None:
    """Controller (keys in a folder: --dhchap-secret-dir, what Kubernetes Secrets are in the
    chart) -> agent -> kernel target; node plugin with the keys as node-stage secrets -> kernel
    initiator under the per-volume NQN; publish_context and every journal without a key."""
    lab = env.lab
    env.restart("--dhchap")
    wait_ready(env.stub)
    keys_dir = "/var/lib/zvolt-controller/dhchap"
    lab.start_controller("--dhchap-secret-dir", keys_dir)  # type: ignore[attr-defined]
    lab.start_node()  # type: ignore[attr-defined]
    csi = Csi(lab)
    try:
        name = uniq("csiauth")
        req = csi_pb2.CreateVolumeRequest(name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                                          volume_capabilities=[mount_cap()], parameters={"dhchap": "bidirectional"})
        vol = csi.ctl.CreateVolume(req, timeout=120).volume
        csi.created.append(vol.volume_id)
        assert vol.volume_context["dhchap"] == "bidirectional"
        secret_file = f"{keys_dir}/{dhchap_secret_name(name)}"
        assert lab.run(["stat", "-c", "%a", keys_dir, secret_file]).stdout.split() == ["700", "600"]
        keys = json.loads(lab.run(["cat", secret_file]).stdout)
        assert sorted(keys) == ["dhchapCtrlKey", "dhchapKey"]
        # kubelet without the node-stage secret is refused, with it the node plugin connects.
        att = csi.attach_with_node_secrets(vol, keys)
        ctx = att.ctx
        assert ctx["dhchap"] == "bidirectional" and not [v for v in ctx.values() if "DHHC-1" in v], ctx
        local = vol.volume_id.split("/")[1]
        ctrls = csi.controllers_for(att.nqn)
        assert ctrls, "the node plugin connected with the node-stage secrets"
        seen = lab.run(["cat", f"/sys/class/nvme/{ctrls[0]}/hostnqn", f"/sys/class/nvme/{ctrls[0]}/hostid"],
                       netns="worker").stdout.split()
        assert seen == [volume_host_nqn(csi.node_id, local), volume_host_id(csi.node_id, local)]
        assert host_attr(env, seen[0], "dhchap_key") == keys["dhchapKey"]
        digest = csi.py(WRITE.format(path=att.target + "/f"))
        assert len(digest) == 64
        for service in ("agent", "controller", "node"):
            log = lab.service_log(service, lines=2000)  # type: ignore[attr-defined]
            for k in keys.values():
                assert k not in log and k.split(":")[2][:20] not in log, f"a key in the {service} log"
        csi.detach(att)
        csi.assert_clean(att)
        csi.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)
        csi.created.remove(vol.volume_id)
        assert lab.run(["test", "-e", secret_file], check=False).returncode != 0, "DeleteVolume removes the keys"
    finally:
        with contextlib.suppress(grpc.RpcError):
            csi.cleanup()
        lab.start_controller()  # type: ignore[attr-defined]
