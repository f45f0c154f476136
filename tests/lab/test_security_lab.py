"""Who may connect, on the real stack: nvmet allow-lists and DH-HMAC-CHAP in the kernel.

The agent runs in the storage netns, `nvme connect` / the CSI node plugin in the worker netns.
Every test restarts the agent with the flags it needs and the module leaves it running with
the standard flags again.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from test_agent_lab import CONFIGFS, Env, MiB, agent_session, host_nqn, uniq, wait_ready  # type: ignore[import-not-found]
from test_csi_lab import WRITE, Csi, mount_cap  # type: ignore[import-not-found]

from agent.dhchap import decode_secret, generate_secret
from zvolt.pb import agent_pb2 as pb

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


def test_dhchap_right_secret_connects_wrong_or_none_is_refused(env: Env) -> None:
    env.restart("--dhchap")
    wait_ready(env.stub)
    host = host_nqn()
    vol = env.create(uniq("auth"), 64 * MiB)
    pub = env.publish(vol.id, host)
    try:
        assert pub.dhchap_secret and not pub.dhchap_ctrl_secret
        assert decode_secret(pub.dhchap_secret)[0] == 1
        assert host_attr(env, host, "dhchap_key") == pub.dhchap_secret
        assert host_attr(env, host, "dhchap_hash") == "hmac(sha256)"
        secret_file = f"/var/lib/zvolt/dhchap/{host}.json"
        assert env.lab.run(["stat", "-c", "%a", secret_file]).stdout.strip() == "600"

        none = refused(connect(env, pub.nqn, host))
        assert "Required key not available" in none or "key" in none.lower(), none
        wrong = refused(connect(env, pub.nqn, host, "--dhchap-secret", generate_secret()))
        assert "Key was rejected" in wrong, wrong
        assert not connected(env, pub.nqn)

        ok = connect(env, pub.nqn, host, "--dhchap-secret", pub.dhchap_secret)
        assert ok.returncode == 0, ok.stderr
        dev = env.device_for(pub.nqn)
        written = env.write(dev, seed=5, mib=2)
        assert env.read_hash(dev, mib=2) == written
    finally:
        env.disconnect(pub.nqn)
    # The key survives an agent restart (persisted), and is restored into the empty host entry.
    env.restart("--dhchap")
    wait_ready(env.stub)
    assert env.publish(vol.id, host).dhchap_secret == pub.dhchap_secret
    assert host_attr(env, host, "dhchap_key") == pub.dhchap_secret
    env.unpublish(vol.id, host)
    env.delete(vol.id)
    assert host not in env.hosts()


def test_dhchap_bidirectional_controller_key(env: Env) -> None:
    env.restart("--dhchap-bidirectional")
    wait_ready(env.stub)
    host = host_nqn()
    vol = env.create(uniq("auth2"), 64 * MiB)
    pub = env.publish(vol.id, host)
    try:
        assert pub.dhchap_secret and pub.dhchap_ctrl_secret and pub.dhchap_secret != pub.dhchap_ctrl_secret
        assert host_attr(env, host, "dhchap_ctrl_key") == pub.dhchap_ctrl_secret
        # The host checks the target too: a target that cannot prove the controller key is refused.
        bad = refused(connect(env, pub.nqn, host, "--dhchap-secret", pub.dhchap_secret,
                              "--dhchap-ctrl-secret", generate_secret()))
        assert not connected(env, pub.nqn), bad
        ok = connect(env, pub.nqn, host, "--dhchap-secret", pub.dhchap_secret,
                     "--dhchap-ctrl-secret", pub.dhchap_ctrl_secret)
        assert ok.returncode == 0, ok.stderr
        assert env.device_for(pub.nqn).startswith("/dev/nvme")
    finally:
        env.disconnect(pub.nqn)
    env.unpublish(vol.id, host)
    env.delete(vol.id)


def test_csi_attach_with_dhchap_end_to_end_and_no_secret_in_logs(env: Env) -> None:
    lab = env.lab
    env.restart("--dhchap")
    wait_ready(env.stub)
    lab.start_controller()  # type: ignore[attr-defined]
    lab.start_node()  # type: ignore[attr-defined]
    csi = Csi(lab)
    try:
        vol = csi.create(uniq("csiauth"))
        att = csi.attach(vol, mount_cap())  # ControllerPublish -> publish_context -> NodeStage -> nvme connect
        assert csi.controllers_for(att.nqn), "the node plugin connected with the secret from publish_context"
        digest = csi.py(WRITE.format(path=att.target + "/f"))
        assert len(digest) == 64
        local = vol.volume_id.split("/")[1]
        secret = env.stub.PublishVolume(pb.PublishVolumeRequest(volume_id=local, host_nqn=csi.node_id),
                                        timeout=120).dhchap_secret
        assert secret and host_attr(env, csi.node_id, "dhchap_key") == secret
        for service in ("agent", "controller", "node"):
            log = lab.service_log(service, lines=2000)  # type: ignore[attr-defined]
            assert secret not in log and secret.split(":")[2][:20] not in log, f"secret in the {service} log"
        csi.detach(att)
        csi.assert_clean(att)
    finally:
        with contextlib.suppress(grpc.RpcError):
            csi.cleanup()
