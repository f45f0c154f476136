"""NVMe/TCP with TLS 1.3 on the real stack: the agent's TLS port, the kernel keyring, tlshd.

The agent (storage netns) publishes a volume with a TLS PSK: the subsystem is linked only to its
TLS port (addr_tsas tls1.3), the retained PSK goes into the kernel's .nvme keyring. The host side
is the node plugin's own adapter (csi.nvme_host.SysfsNvmeHost with the kernel keyring) run in the
worker netns: it connects with `tls`, the kernel asks tlshd for the handshake, data goes through.

Attacks, with the user-space initiator of the attack tests (tests/lab/nvme_tcp.py, clear text):
the per-volume host NQN in the clear, on the TLS port and on the clear-text port, reads nothing;
against a weakened target (the same subsystem also linked to the clear-text port, which is what
a volume without TLS is) the same call reads the volume's data, so the refusals are TLS's.

One guest is one kernel keyring: the target's and the host's PSKs (filed from two netns, so two
keys) are both found by either side's lookup, so a host with a wrong PSK is shown on two guests
(test_a_host_with_a_wrong_psk_is_refused_by_another_kernel, slow).

tlshd (ktls-utils) is not packaged for Debian 12. The tests run when a bundle is present: a
.tar.gz of a root tree holding usr/sbin/tlshd and the shared libraries it needs that the lab
guest lacks ($ZVOLT_TLSHD_BUNDLE, default ~/.cache/zvolt-tls/tlshd-root.tgz); otherwise they
skip with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_agent_lab import CONFIGFS, Env, MiB, agent_session, uniq, wait_ready  # type: ignore[import-not-found]

from zvolt import tlspsk
from zvolt.names import volume_host_id
from zvolt.pb import agent_pb2 as pb

pytestmark = pytest.mark.lab

BUNDLE = Path(os.environ.get("ZVOLT_TLSHD_BUNDLE", str(Path.home() / ".cache" / "zvolt-tls" / "tlshd-root.tgz")))
TOOL_SRC = Path(__file__).with_name("nvme_tcp.py")
GUEST = "/run/zvolt-tls"
TLSHD_ROOT = "/opt/zvolt-tlshd"
HOST = "nqn.2014-08.org.nvmexpress:uuid:7d3c1c6e-5a51-4f0e-9a0b-2c1e5b3f9a10"
STORAGE_IP, PLAIN_PORT, TLS_PORT = "10.42.0.1", "4420", "4421"
BLOCK = 4096


def _say(what: str) -> None:
    print(f"\nTLS {what}", flush=True)


def start_tlshd(lab: Any, netns: list[str]) -> None:
    """tlshd from the bundle, one per netns: the kernel asks the handshake daemon of the
    socket's own network namespace."""
    if not BUNDLE.is_file():
        pytest.skip(f"NVMe/TCP TLS lab tests skipped: no tlshd bundle at {BUNDLE} (Debian 12 has no ktls-utils)")
    lab.run(["mkdir", "-p", GUEST, TLSHD_ROOT])
    lab.put(BUNDLE, f"{GUEST}/tlshd.tgz")
    lab.put(TOOL_SRC, f"{GUEST}/nvme_tcp.py")
    lab.run(["tar", "xzf", f"{GUEST}/tlshd.tgz", "-C", TLSHD_ROOT])
    lab.run(["sh", "-c", f"printf '[debug]\\nloglevel=1\\ntls=0\\nnl=0\\n' > {TLSHD_ROOT}/tlshd.conf"])
    lab.run(["modprobe", "tls"])
    libs = f"{TLSHD_ROOT}/usr/lib/x86_64-linux-gnu:{TLSHD_ROOT}/lib/x86_64-linux-gnu"
    for ns in netns:
        unit = f"zvolt-tlshd-{ns}"
        lab.run(["systemctl", "stop", unit], check=False)
        lab.run(["systemd-run", "--unit", unit, "--collect", "--quiet", "-p", f"NetworkNamespacePath=/run/netns/{ns}",
                 f"--setenv=LD_LIBRARY_PATH={libs}", "--", f"{TLSHD_ROOT}/usr/sbin/tlshd", "-s",
                 "-c", f"{TLSHD_ROOT}/tlshd.conf"])


def stop_tlshd(lab: Any, netns: list[str]) -> None:
    for ns in netns:
        lab.run(["systemctl", "stop", f"zvolt-tlshd-{ns}"], check=False)


def tlshd_journal(lab: Any, netns: list[str]) -> str:
    units = [a for ns in netns for a in ("-u", f"zvolt-tlshd-{ns}")]
    return str(lab.run(["journalctl", *units, "--no-pager", "-o", "cat"]).stdout)


@pytest.fixture(scope="module")
def tlshd(lab: Any) -> Iterator[Any]:
    start_tlshd(lab, ["storage", "worker"])
    yield lab
    stop_tlshd(lab, ["storage", "worker"])


@pytest.fixture(scope="module")
def env(tlshd: Any) -> Iterator[Env]:
    with agent_session(tlshd, fresh=True, restore=False) as e:
        yield e
    # A TLS port left behind would take the next module's clear-text volumes on 4421.
    tlshd.py(f"""
import os
root = {CONFIGFS!r} + '/ports'
for pid in os.listdir(root):
    port = f'{{root}}/{{pid}}'
    if open(port + '/addr_trsvcid').read().strip() == {TLS_PORT!r} and not os.listdir(port + '/subsystems'):
        os.rmdir(port)
""")


def host_py(lab: Any, code: str, netns: str = "worker", timeout: float = 180) -> Any:
    """Python on the host side with the node plugin's NVMe adapter and the kernel keyring."""
    prelude = "import json, sys\nsys.path.insert(0, '/src')\nfrom csi.nvme_host import ConnectSpec, SysfsNvmeHost\n" \
              "from zvolt.keyring import KernelKeyring\nhost = SysfsNvmeHost(keyring=KernelKeyring())\n"
    out = lab.py(prelude + code, netns=netns, timeout=timeout).stdout.strip().splitlines()
    return json.loads(out[-1]) if out else None


def connect(lab: Any, nqn: str, hostnqn: str, hostid: str, psk: str, address: str = STORAGE_IP,
            netns: str = "worker") -> str:
    """The node plugin's connect (psk "": clear text, through nvme-cli) and its device."""
    spec = dict(nqn=nqn, transport="tcp", address=address, port=TLS_PORT if psk else PLAIN_PORT, hostnqn=hostnqn,
                hostid=hostid, ctrl_loss_tmo=30, reconnect_delay=1, tls_psk=psk)
    return str(host_py(lab, f"""
from csi.nvme_host import wait_for_device
host.connect(ConnectSpec(**{spec!r}))
print(json.dumps(wait_for_device(host, {nqn!r}, 60)))
""", netns))


def controller(lab: Any, nqn: str, netns: str = "worker") -> dict[str, str]:
    return dict(host_py(lab, f"""
import glob, os
for c in sorted(glob.glob('/sys/class/nvme/nvme*')):
    if open(c + '/subsysnqn').read().strip() == {nqn!r}:
        read = lambda n: open(c + '/' + n).read().strip() if os.path.exists(c + '/' + n) else ''
        print(json.dumps(dict(name=os.path.basename(c), state=read('state'), tls_key=read('tls_key'),
                              address=read('address'), hostnqn=read('hostnqn'))))
        break
else:
    print(json.dumps({{}}))
""", netns))


def clear_text_read(lab: Any, nqn: str, hostnqn: str, hostid: str, port: str, address: str = STORAGE_IP,
                    netns: str = "worker") -> dict[str, Any]:
    proc = lab.run([lab.python, f"{GUEST}/nvme_tcp.py", "read", "--traddr", address, "--trsvcid", port,
                    "--subnqn", nqn, "--hostnqn", hostnqn, "--hostid", hostid, "--length", str(BLOCK),
                    "--timeout", "20"], netns=netns, check=False, timeout=120)
    assert proc.returncode in (0, 2) and proc.stdout.strip(), f"attack tool failed: {proc.stdout}\n{proc.stderr}"
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _port_dir(lab: Any, port: str) -> str:
    out = lab.py(f"""
import os
root = {CONFIGFS!r} + '/ports'
print(next((f'{{root}}/{{p}}' for p in os.listdir(root)
            if open(f'{{root}}/{{p}}/addr_trsvcid').read().strip() == {port!r}), ''))
""").stdout.strip()
    assert out, f"no nvmet port {port}"
    return str(out)


def _keys(lab: Any) -> str:
    return str(lab.run(["cat", "/proc/keys"]).stdout)


def test_a_tls_volume_carries_data_over_tls_and_refuses_clear_text(env: Env) -> None:
    lab = env.lab
    vol = env.stub.CreateVolume(pb.CreateVolumeRequest(name=uniq("tls"), size_bytes=64 * MiB), timeout=60).volume
    psk = tlspsk.generate()
    resp = env.stub.PublishVolume(pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=HOST, tls_psk=psk), timeout=120)
    nqn, hostnqn, hostid = resp.nqn, resp.host_nqn, volume_host_id(HOST, vol.id)
    assert resp.port == TLS_PORT and hostnqn != HOST
    tls_dir = _port_dir(lab, TLS_PORT)
    assert lab.run(["cat", f"{tls_dir}/addr_tsas", f"{tls_dir}/addr_treq"]).stdout.split() == ["tls1.3", "required"]
    assert nqn in lab.run(["ls", f"{tls_dir}/subsystems"]).stdout.split()
    linked = lab.run(["sh", "-c", f"ls {CONFIGFS}/ports/*/subsystems"]).stdout.split()
    assert linked.count(nqn) == 1, "the TLS port only"
    identity = tlspsk.identity(psk, hostnqn, nqn)
    assert identity in _keys(lab), "the agent filed the retained PSK in the .nvme keyring"

    started = time.monotonic()
    device = connect(lab, nqn, hostnqn, hostid, psk)
    connect_s = time.monotonic() - started
    ctrl = controller(lab, nqn)
    assert ctrl["state"] == "live" and ctrl["tls_key"], f"controller is not a TLS one: {ctrl}"
    assert f"trsvcid={TLS_PORT}" in ctrl["address"]
    _say(f"connect with TLS handshake + namespace: {connect_s:.1f} s; controller {ctrl['name']} tls_key "
         f"{ctrl['tls_key']}")
    journal = tlshd_journal(lab, ["storage", "worker"])
    assert "Handshake request succeeded" in journal, journal[-2000:]

    marker = (f"zvolt-tls-{uuid.uuid4().hex}|".encode() * 200)[:BLOCK]
    lab.run(["dd", f"of={device}", "bs=4096", "count=1", "oflag=direct", "status=none"], netns="worker",
            input=marker.decode())
    got = lab.run(["dd", f"if={device}", "bs=4096", "count=1", "iflag=direct", "status=none"], netns="worker")
    assert got.stdout.encode() == marker

    # A clear-text volume keeps the clear-text port listening, so a refusal there is the target's.
    plain = env.stub.CreateVolume(pb.CreateVolumeRequest(name=uniq("plain"), size_bytes=16 * MiB), timeout=60).volume
    plain_nqn = env.stub.PublishVolume(pb.PublishVolumeRequest(volume_id=plain.id, host_nqn=HOST), timeout=120).nqn
    started = time.monotonic()
    connect(lab, plain_nqn, HOST, str(uuid.uuid4()), "")
    plain_s = time.monotonic() - started
    _say(f"same harness, clear-text connect + namespace: {plain_s:.1f} s; TLS {connect_s:.1f} s "
         f"({connect_s / plain_s:.2f}x)")
    host_py(lab, f"host.disconnect({controller(lab, plain_nqn)['name']!r}); print(json.dumps(1))")
    plain_dir = _port_dir(lab, PLAIN_PORT)
    # Clear text, with everything the host has but the key: refused on both ports.
    on_tls = clear_text_read(lab, nqn, hostnqn, hostid, TLS_PORT)
    on_plain = clear_text_read(lab, nqn, hostnqn, hostid, PLAIN_PORT)
    _say(f"clear-text read on the TLS port: {on_tls.get('step')}: {on_tls.get('error', '')[:120]}")
    _say(f"clear-text read on the clear-text port: {on_plain.get('step')}: {on_plain.get('error', '')[:120]}")
    assert not on_tls["ok"] and not on_plain["ok"]
    # Weakened target: the same subsystem also on the clear-text port (a volume without TLS).
    # In the storage netns: the first link enables the port, which binds in the writer's netns.
    lab.run(["nsenter", "--net=/run/netns/storage", "ln", "-s", f"{CONFIGFS}/subsystems/{nqn}",
             f"{plain_dir}/subsystems/{nqn}"])
    try:
        weak = clear_text_read(lab, nqn, hostnqn, hostid, PLAIN_PORT)
    finally:
        lab.run(["rm", "-f", f"{plain_dir}/subsystems/{nqn}"])
    assert weak["ok"] and bytes.fromhex(weak["data"]) == marker, "the tool reads a volume that is not behind TLS"
    _say("weakened target (also on the clear-text port): the same read returns the volume's data")

    # The agent restarts: the TLS export is still whole, the host's TLS controller still works.
    env.restart()
    wait_ready(env.stub)
    state = env.stub.GetVolume(pb.GetVolumeRequest(volume_id=vol.id), timeout=60).volume
    assert state.condition == pb.VOLUME_CONDITION_HEALTHY, state.condition_message
    got = lab.run(["dd", f"if={device}", "bs=4096", "count=1", "iflag=direct", "status=none"], netns="worker")
    assert got.stdout.encode() == marker

    # Unpublish: the target ends the host's controller (the reconnect finds no subsystem and the
    # host deletes it) and drops its PSK; NodeUnstageVolume's forget_psks drops the host's.
    env.stub.UnpublishVolume(pb.UnpublishVolumeRequest(volume_id=vol.id, host_nqn=hostnqn), timeout=120)
    deadline = time.monotonic() + 60
    while controller(lab, nqn) and time.monotonic() < deadline:
        time.sleep(1)
    assert controller(lab, nqn) == {}, "the revoked host's controller is gone"
    assert _keys(lab).count(identity) == 1, "the agent took one of the two filed copies out"
    host_py(lab, f"host.forget_psks({hostnqn!r}, {nqn!r}); print(json.dumps(1))")
    assert identity not in _keys(lab)
    env.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id), timeout=120)
    env.stub.UnpublishVolume(pb.UnpublishVolumeRequest(volume_id=plain.id, host_nqn=HOST), timeout=120)
    env.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=plain.id), timeout=120)


def test_a_publish_with_a_malformed_psk_is_refused_without_echoing_it(env: Env) -> None:
    vol = env.stub.CreateVolume(pb.CreateVolumeRequest(name=uniq("tlsbad"), size_bytes=16 * MiB), timeout=60).volume
    bad = "NVMeTLSkey-1:01:" + "A" * 44 + ":"
    with pytest.raises(grpc.RpcError) as err:
        env.stub.PublishVolume(pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=HOST, tls_psk=bad), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "A" * 20 not in (err.value.details() or "")
    env.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id), timeout=60)


# A process that joins a fresh keyring session (as a container does), looks for the .nvme keyring
# in /proc/keys, links it to possess it, searches the identity and reads the key.
KEYRING_READER = r'''
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def keyctl(*args):
    argv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    got = libc.syscall(ctypes.c_long(250), *argv)
    return got if got >= 0 else -ctypes.get_errno()
keyctl(1, ctypes.c_char_p(None))  # KEYCTL_JOIN_SESSION_KEYRING: a new anonymous session
found = [line.split()[0] for line in open("/proc/keys") if " .nvme:" in line]
out = {"uid": os.getuid(), "sees_keyring": bool(found), "psk": ""}
if found:
    ring = int(found[0], 16)
    keyctl(8, ring, -3)  # KEYCTL_LINK into the session keyring: possession
    key = keyctl(10, ring, ctypes.c_char_p(b"psk"), ctypes.c_char_p(sys.argv[1].encode()), 0)
    if key > 0:
        buf = ctypes.create_string_buffer(64)
        n = keyctl(11, key, buf, 64)  # KEYCTL_READ
        out["psk"] = buf.raw[:n].hex() if n > 0 else ""
print(json.dumps(out))
'''


def test_the_retained_psk_is_readable_by_uid_0_only_FINDING(tlshd: Any) -> None:
    """Who on a worker can read a staged volume's retained PSK from the kernel keyring: not
    another uid (a pod's usual user); uid 0, even without capabilities, yes (SECURITY.md 3a)."""
    lab = tlshd
    lab.run(["mkdir", "-p", GUEST])
    lab.run(["sh", "-c", f"cat > {GUEST}/keyring_reader.py && chmod 0755 {GUEST} && "
                         f"chmod 0644 {GUEST}/keyring_reader.py"], input=KEYRING_READER)
    psk = tlspsk.generate()
    host_nqn, sub = f"{HOST}:v:0123456789abcdef", "nqn.2026-11.io.zvolt:storage-0:vfinding"
    identity, retained = tlspsk.identity(psk, host_nqn, sub), tlspsk.retained(psk, host_nqn)
    host_py(lab, f"host.keyring.put({identity!r}, bytes.fromhex({retained.hex()!r})); print(json.dumps(1))")
    try:
        drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        reads = {}
        for who, prefix in (("nobody", ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *drop[1:]]),
                            ("uid 0 without capabilities", drop)):
            proc = lab.run([*prefix, lab.python, f"{GUEST}/keyring_reader.py", identity], netns="worker")
            reads[who] = json.loads(proc.stdout.strip().splitlines()[-1])
            _say(f"keyring read as {who}: sees .nvme {reads[who]['sees_keyring']}, "
                 f"reads the PSK {reads[who]['psk'] == retained.hex()}")
        assert not reads["nobody"]["sees_keyring"] and reads["nobody"]["psk"] == ""
        assert reads["uid 0 without capabilities"]["psk"] == retained.hex(), "FINDING changed: update SECURITY.md"
    finally:
        host_py(lab, f"host.forget_psks({host_nqn!r}, {sub!r}); print(json.dumps(1))")


def test_csi_attach_with_tls_and_dhchap_end_to_end_and_no_key_in_logs(env: Env) -> None:
    """The CSI path on the kernel: controller (keys in a folder, --dhchap-secret-dir, what the
    chart's Secrets are) -> agent -> TLS port; the node plugin service with the Secret as its
    node-stage secrets connects with TLS and DH-HMAC-CHAP under its per-volume NQN, a filesystem
    goes on and is written; no key in publish_context or any journal; detach leaves no PSK."""
    from test_csi_lab import WRITE, Csi, mount_cap  # type: ignore[import-not-found]

    from zvolt.names import dhchap_secret_name, volume_host_nqn
    from zvolt.pb import csi_pb2

    lab = env.lab
    keys_dir = "/var/lib/zvolt-controller/dhchap"
    lab.start_controller("--dhchap-secret-dir", keys_dir)  # type: ignore[attr-defined]
    lab.start_node()  # type: ignore[attr-defined]
    csi = Csi(lab)
    try:
        name = uniq("csitls")
        req = csi_pb2.CreateVolumeRequest(name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                                          volume_capabilities=[mount_cap()],
                                          parameters={"tls": "psk", "dhchap": "bidirectional"})
        vol = csi.ctl.CreateVolume(req, timeout=120).volume
        csi.created.append(vol.volume_id)
        assert (vol.volume_context["tls"], vol.volume_context["dhchap"]) == ("psk", "bidirectional")
        secret_file = f"{keys_dir}/{dhchap_secret_name(name)}"
        keys = json.loads(lab.run(["cat", secret_file]).stdout)
        assert sorted(keys) == ["dhchapCtrlKey", "dhchapKey", "tlsPsk"]
        started = time.monotonic()
        att = csi.attach_with_node_secrets(vol, keys)
        staged_s = time.monotonic() - started
        ctx = att.ctx
        assert ctx["tls"] == "psk" and ctx["port"] == TLS_PORT, ctx
        assert not [v for v in ctx.values() if any(k in v for k in keys.values())], sorted(ctx)
        ctrl = controller(lab, att.nqn)
        local = vol.volume_id.split("/")[1]
        assert ctrl["tls_key"] and ctrl["hostnqn"] == volume_host_nqn(csi.node_id, local), ctrl
        assert f"trsvcid={TLS_PORT}" in ctrl["address"]
        digest = csi.py(WRITE.format(path=att.target + "/f"))
        assert len(digest) == 64
        _say(f"attach with TLS + DH-HMAC-CHAP (ControllerPublish, NodeStage refused without the secret, "
             f"NodeStage with it: connect, mkfs, mount; NodePublish): {staged_s:.1f} s")
        identity = tlspsk.identity(keys["tlsPsk"], ctrl["hostnqn"], att.nqn)
        journals = {s: lab.service_log(s, lines=3000) for s in ("agent", "controller", "node")}  # type: ignore
        journals["tlshd"] = tlshd_journal(lab, ["storage", "worker"])
        for service, log in journals.items():
            for k in keys.values():
                assert k not in log and k.split(":")[2][:20] not in log, f"a key in the {service} log"
        csi.detach(att)
        csi.assert_clean(att)
        assert identity not in _keys(lab), "NodeUnstage and ControllerUnpublish took both PSKs out"
        csi.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)
        csi.created.remove(vol.volume_id)
        assert lab.run(["test", "-e", secret_file], check=False).returncode != 0, "DeleteVolume removes the keys"
    finally:
        with contextlib.suppress(grpc.RpcError):
            csi.cleanup()
        lab.start_controller()  # type: ignore[attr-defined]


def test_without_tlshd_on_the_host_the_connect_fails_and_says_so(env: Env) -> None:
    """A worker where tlshd does not run: the kernel has nobody to hand the handshake to; the node
    plugin's connect fails (no hang) with an error that names tlshd, and works once it runs."""
    lab = env.lab
    vol = env.stub.CreateVolume(pb.CreateVolumeRequest(name=uniq("notlshd"), size_bytes=16 * MiB), timeout=60).volume
    psk = tlspsk.generate()
    resp = env.stub.PublishVolume(pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=HOST, tls_psk=psk), timeout=120)
    hostid = volume_host_id(HOST, vol.id)
    stop_tlshd(lab, ["worker"])
    try:
        started = time.monotonic()
        with pytest.raises(Exception) as err:
            connect(lab, resp.nqn, resp.host_nqn, hostid, psk)
        took = time.monotonic() - started
        message = str(err.value).splitlines()[-1]
        _say(f"connect without tlshd on the host failed in {took:.1f} s: {message[-200:]}")
        assert "tlshd" in message and psk not in message
        assert controller(lab, resp.nqn) == {}
    finally:
        start_tlshd(lab, ["worker"])
    connect(lab, resp.nqn, resp.host_nqn, hostid, psk)
    name = controller(lab, resp.nqn)["name"]
    host_py(lab, f"host.disconnect({name!r}); host.forget_psks({resp.host_nqn!r}, {resp.nqn!r}); print(json.dumps(1))")
    env.stub.UnpublishVolume(pb.UnpublishVolumeRequest(volume_id=vol.id, host_nqn=resp.host_nqn), timeout=120)
    env.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id), timeout=120)
