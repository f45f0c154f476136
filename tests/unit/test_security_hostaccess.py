"""Host access on the emulated configfs: allow_any_host=0, exact allow-lists, drift detected and repaired."""

from __future__ import annotations

import os
from pathlib import Path

from agent.dhchap import HostKeys, HostSecrets, generate_secret
from agent.fakes import make_node
from agent.volumes import VolumeSpec
from zvolt.names import volume_host_nqn

HOST_A = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-000000000001"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-4000-8000-000000000002"
STRANGER = "nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-4000-8000-000000000003"
GiB = 1 << 30


def _attr(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_allow_list_is_exactly_the_published_hosts_and_drift_is_reported_and_repaired(tmp_path: Path) -> None:
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"))
    v = node.volumes
    rec = v.create_volume(VolumeSpec(name="acl", size=GiB))
    nqn = v.publish(rec.id, HOST_A)
    v.publish(rec.id, HOST_B)
    sub = os.path.join(node.root.path, "subsystems", nqn)
    assert _attr(os.path.join(sub, "attr_allow_any_host")) == "0"
    assert sorted(os.listdir(os.path.join(sub, "allowed_hosts"))) == sorted([HOST_A, HOST_B])
    assert v.get_volume(rec.id).healthy

    # Tampering: access control switched off behind the agent's back.
    with open(os.path.join(sub, "attr_allow_any_host"), "w") as f:
        f.write("1")
    state = v.get_volume(rec.id)
    assert not state.healthy and "allow_any_host" in state.message
    v.publish(rec.id, HOST_A)  # a repeat publish repairs instead of short-cutting
    assert _attr(os.path.join(sub, "attr_allow_any_host")) == "0" and v.get_volume(rec.id).healthy

    # A foreign host link is reported and removed on the next publish/restart.
    os.makedirs(os.path.join(node.root.path, "hosts", STRANGER))
    os.symlink(os.path.join(node.root.path, "hosts", STRANGER), os.path.join(sub, "allowed_hosts", STRANGER))
    assert not v.get_volume(rec.id).healthy
    restarted = node.restart(str(tmp_path / "s"))
    assert restarted.readiness.ready
    assert sorted(os.listdir(os.path.join(sub, "allowed_hosts"))) == sorted([HOST_A, HOST_B])
    assert not os.path.exists(os.path.join(restarted.root.path, "hosts", STRANGER))

    # Unpublish removes exactly one host; the last one removes the subsystem and host entries.
    restarted.volumes.unpublish(rec.id, HOST_A)
    assert os.listdir(os.path.join(sub, "allowed_hosts")) == [HOST_B]
    restarted.volumes.unpublish(rec.id, HOST_B)
    assert not os.path.exists(sub)
    assert os.listdir(os.path.join(restarted.root.path, "hosts")) == []


def test_with_auth_a_host_without_a_key_is_reported(tmp_path: Path) -> None:
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"))
    node.volumes.exports.auth = HostKeys(str(tmp_path / "s"))
    rec = node.volumes.create_volume(VolumeSpec(name="keyed", size=GiB))
    keys = HostSecrets(HOST_A, generate_secret())
    node.volumes.publish(rec.id, HOST_A, auth=keys)
    key_file = os.path.join(node.root.path, "hosts", volume_host_nqn(HOST_A, rec.id), "dhchap_key")
    assert _attr(key_file) == keys.secret
    assert node.volumes.get_volume(rec.id).healthy
    os.unlink(key_file)  # what an emptied key looks like on the emulated tree
    state = node.volumes.get_volume(rec.id)
    assert not state.healthy and "DH-HMAC-CHAP" in state.message
    node.volumes.publish(rec.id, HOST_A, auth=keys)
    assert _attr(key_file) == keys.secret and node.volumes.get_volume(rec.id).healthy
