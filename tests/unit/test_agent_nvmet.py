"""The configfs object layer against an emulated tree, and its nvmetcli-style JSON dump."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent import nvmet
from agent.exports import device_nguid, device_uuid
from zvolt.errors import ZvoltError

NQN = "nqn.2026-11.io.zvolt:storage-0:vabc"
HOST = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001"


@pytest.fixture
def root(tmp_path: Path) -> nvmet.Root:
    r = nvmet.Root(str(tmp_path / "nvmet"), emulate=True)
    r.init_tree()
    return r


def build(root: nvmet.Root) -> nvmet.Subsystem:
    sub = root.subsystem(NQN)
    sub.create()
    sub.set_attr("allow_any_host", "0")
    ns = sub.namespace(1)
    ns.create()
    ns.set_attr("device_path", "/dev/zvol/tank/zvolt/v/vabc")
    ns.set_attr("device_uuid", device_uuid("vabc"))
    ns.set_attr("device_nguid", device_nguid("vabc"))
    ns.set_attr("enable", "1")
    sub.allow_host(root.host(HOST))
    port = root.find_or_create_port("10.42.0.1", "4420")
    port.add_subsystem(sub)
    return sub


def test_dump_is_nvmetcli_shaped(root: nvmet.Root) -> None:
    build(root)
    dump = root.dump()
    json.dumps(dump)  # serialisable
    assert dump["hosts"] == [{"nqn": HOST}]
    (port,) = dump["ports"]
    assert port["portid"] == 1 and port["subsystems"] == [NQN]
    assert port["addr"]["trtype"] == "tcp" and port["addr"]["adrfam"] == "ipv4"
    assert port["addr"]["traddr"] == "10.42.0.1" and port["addr"]["trsvcid"] == "4420"
    (sub,) = dump["subsystems"]
    assert sub["nqn"] == NQN and sub["allowed_hosts"] == [HOST]
    assert sub["attr"]["allow_any_host"] == "0"
    (ns,) = sub["namespaces"]
    assert ns["nsid"] == 1 and ns["enable"] == 1
    assert ns["device"] == {"path": "/dev/zvol/tank/zvolt/v/vabc", "uuid": device_uuid("vabc"),
                            "nguid": device_nguid("vabc")}


def test_allowed_host_is_a_symlink_to_the_host_group(root: nvmet.Root) -> None:
    sub = build(root)
    link = os.path.join(sub.path, "allowed_hosts", HOST)
    assert os.path.islink(link) and os.readlink(link) == root.host(HOST).path
    sub.allow_host(root.host(HOST))  # idempotent
    sub.disallow_host(HOST)
    sub.disallow_host(HOST)
    assert sub.allowed_hosts() == []


def test_teardown_order_and_idempotence(root: nvmet.Root) -> None:
    sub = build(root)
    port = root.find_or_create_port("10.42.0.1", "4420")
    sub.delete()
    assert not sub.exists() and port.subsystems() == []
    sub.delete()
    # The port is reused, not duplicated.
    assert root.find_or_create_port("10.42.0.1", "4420").portid == port.portid
    assert root.find_or_create_port("10.42.0.1", "4421").portid == 2


def test_uuids_are_stable_and_distinct() -> None:
    assert device_uuid("vabc") == device_uuid("vabc")
    assert device_uuid("vabc") != device_uuid("vabd")
    assert device_uuid("vabc") != device_nguid("vabc")


@pytest.mark.parametrize("bad", ["../../etc", "nqn.2026-11.io.zvolt:a/b", "x"])
def test_names_are_validated_before_paths(root: nvmet.Root, bad: str) -> None:
    with pytest.raises(ZvoltError):
        root.subsystem(bad)
    with pytest.raises(ZvoltError):
        root.host(bad)


def test_cli_dump_prints_the_same_json(root: nvmet.Root, capsys: pytest.CaptureFixture[str]) -> None:
    build(root)
    assert nvmet.main([root.path]) == 0
    assert json.loads(capsys.readouterr().out) == root.dump()


def test_reset_controllers_writes_attr_qid_max_back_unchanged(root: nvmet.Root, tmp_path: Path) -> None:
    sub = build(root)
    sub.reset_controllers()  # emulation: the kernel's default, as a fresh subsystem shows it
    assert sub.attr("qid_max") == str(nvmet.QID_MAX_DEFAULT)
    sub.set_attr("qid_max", "8")
    sub.reset_controllers()
    assert sub.attr("qid_max") == "8"
    assert sub.allowed_hosts() == [HOST] and sub.namespace(1).enabled  # nothing else changes
    # A real configfs without the attribute (an older kernel) cannot end controllers: say so.
    real = nvmet.Root(str(tmp_path / "old-kernel"))
    os.makedirs(os.path.join(real.path, "subsystems", NQN))
    with pytest.raises(nvmet.NvmetError, match="attr_qid_max"):
        real.subsystem(NQN).reset_controllers()


class FlakyEnable(nvmet.Root):
    """configfs whose namespace `enable` fails `fails` times with `errno` first."""

    def __init__(self, path: str, fails: int, errno: int) -> None:
        super().__init__(path, emulate=True)
        object.__setattr__(self, "left", [fails, errno])

    def write(self, path: str, value: str) -> None:
        left = self.left  # type: ignore[attr-defined]
        if path.endswith("/enable") and value == "1" and left[0] > 0:
            left[0] -= 1
            raise OSError(left[1], "configfs write failed")
        super().write(path, value)


@pytest.mark.parametrize(("fails", "errno", "enabled"), [
    (2, nvmet.ERESTARTSYS, True),  # transient: zvol_open lost the race for the pool lock
    (nvmet.ENABLE_ATTEMPTS, nvmet.ERESTARTSYS, False),  # still failing: the caller learns
    (1, 2, False),  # any other error (ENOENT: the device is gone) is final at once
])
def test_namespace_enable_retries_only_the_transient_error(tmp_path: Path, fails: int, errno: int,
                                                           enabled: bool) -> None:
    root = FlakyEnable(str(tmp_path / "nvmet"), fails, errno)
    root.init_tree()
    sub = root.subsystem(NQN)
    sub.create()
    ns = sub.namespace(1)
    ns.create()
    if enabled:
        ns.enable(backoff=0.001)
    else:
        with pytest.raises(OSError) as info:
            ns.enable(backoff=0.001)
        assert info.value.errno == errno
    assert ns.enabled is enabled
    assert root.left[0] == 0  # type: ignore[attr-defined]
