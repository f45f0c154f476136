"""The node plugin's adapters: exact argv, sysfs lookups, mount-flag allow-list, host identity."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from csi.host_identity import load_or_create
from csi.mounter import SystemMounter, check_mount_flags
from csi.nvme_host import ConnectSpec, SysfsNvmeHost, connect_argv, ours
from csi.runner import Result
from zvolt.errors import ZvoltError
from zvolt.names import check_nqn

NQN = "nqn.2026-11.io.zvolt:storage-0:vabc"
HOST = "nqn.2026-11.io.zvolt:host:w:11111111-1111-4111-8111-111111111111"


class Recorder:
    def __init__(self, results: dict[str, Result] | None = None) -> None:
        self.argvs: list[list[str]] = []
        self.results = results or {}

    def __call__(self, argv: Sequence[str], timeout: float) -> Result:
        self.argvs.append(list(argv))
        return self.results.get(argv[0], Result(0, "", ""))


def spec(**kw: str) -> ConnectSpec:
    base = dict(nqn=NQN, transport="tcp", address="10.42.0.1", port="4420", hostnqn=HOST, hostid="1111")
    base.update(kw)
    return ConnectSpec(ctrl_loss_tmo=600, reconnect_delay=5, **base)  # type: ignore[arg-type]


def test_connect_argv_passes_identity_and_timeouts_explicitly() -> None:
    assert connect_argv(spec()) == [
        "nvme", "connect", "--transport", "tcp", "--traddr", "10.42.0.1", "--trsvcid", "4420", "--nqn", NQN,
        "--hostnqn", HOST, "--hostid", "1111", "--ctrl-loss-tmo", "600", "--reconnect-delay", "5",
    ]  # fmt: skip
    secret = "DHHC-1:01:abcdEFGH1234+/=:"
    assert connect_argv(spec(dhchap_secret=secret))[-2:] == ["--dhchap-secret", secret]


@pytest.mark.parametrize(
    "bad",
    [
        {"address": "-oX"}, {"address": "10.0.0.1 --hostnqn x"}, {"port": "0"}, {"port": "44a"},
        {"transport": "rdma"}, {"nqn": "nqn.x;rm"}, {"dhchap_secret": "plain"},
    ],
)  # fmt: skip
def test_connect_spec_rejects_injection(bad: dict[str, str]) -> None:
    with pytest.raises(ZvoltError) as err:
        connect_argv(spec(**bad))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _sysfs(root: Path, multipath: bool) -> None:
    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    for name, nqn, host, state in (("nvme0", "nqn.2026-11.io.zvolt:storage-0:vother", HOST, "live"),
                                   ("nvme1", NQN, HOST, "connecting"),
                                   ("nvme2", NQN, "nqn.2014-08.org.nvmexpress:uuid:x", "live")):  # fmt: skip
        ctl = root / "class" / "nvme" / name
        write(ctl / "subsysnqn", nqn)
        write(ctl / "hostnqn", host)
        write(ctl / "state", state)
        write(ctl / "transport", "tcp")
        write(ctl / "address", "traddr=10.42.0.1,trsvcid=4420")
    if multipath:
        write(root / "class" / "nvme-subsystem" / "nvme-subsys1" / "subsysnqn", NQN)
        (root / "class" / "nvme-subsystem" / "nvme-subsys1" / "nvme1n1").mkdir()
        (root / "class" / "nvme" / "nvme1" / "nvme1c1n1").mkdir()
    else:
        (root / "class" / "nvme" / "nvme1" / "nvme1n1").mkdir()
    write(root / "class" / "block" / "nvme1n1" / "size", "2097152")


@pytest.mark.parametrize("multipath", [True, False])
def test_sysfs_lookup_by_subsystem_nqn(tmp_path: Path, multipath: bool) -> None:
    _sysfs(tmp_path, multipath)
    host = SysfsNvmeHost(str(tmp_path), runner=Recorder(), dev_root=str(tmp_path / "dev"))
    ctrls = host.controllers(NQN)
    assert [c.name for c in ctrls] == ["nvme1", "nvme2"]
    assert [(c.name, c.state) for c in ours(ctrls, HOST)] == [("nvme1", "connecting")]
    assert host.namespace_device(NQN) is None  # in sysfs, but no device node yet: not there for a user
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvme1n1").touch()
    assert host.namespace_device(NQN) == str(tmp_path / "dev" / "nvme1n1")
    assert host.namespace_device("nqn.2026-11.io.zvolt:storage-0:vnone") is None
    assert host.device_size("/dev/nvme1n1") == 1 << 30


def test_nvme_actions_argv(tmp_path: Path) -> None:
    rec = Recorder()
    host = SysfsNvmeHost(str(tmp_path), runner=rec)
    host.connect(spec())
    host.disconnect("nvme3")
    host.rescan("nvme3")
    assert rec.argvs[1:] == [["nvme", "disconnect", "--device", "nvme3"], ["nvme", "ns-rescan", "/dev/nvme3"]]
    for bad in ("nvme3 -n x", "../nvme3", "sda"):
        with pytest.raises(ZvoltError):
            host.disconnect(bad)
    failing = SysfsNvmeHost(str(tmp_path), runner=Recorder({"nvme": Result(1, "", "could not add new controller")}))
    with pytest.raises(ZvoltError) as err:
        failing.connect(spec())
    assert "could not add new controller" in err.value.message


@pytest.mark.parametrize(
    "good", [["noatime"], ["ro", "nodev"], ["noatime,nodiratime"], ["data=ordered"], ["commit=30"]]
)
def test_mount_flags_allowed(good: list[str]) -> None:
    assert check_mount_flags(good)


@pytest.mark.parametrize(
    "bad",
    [["exec"], ["suid"], ["dev"], ["loop"], ["x-mount.mkdir"], ["context=system_u:x"], ["data=/etc"],
     ["noatime,remount"], ["uid=0"], ["errors=remount-ro --bind"], ["-o"]],
)  # fmt: skip
def test_mount_flags_refused(bad: list[str]) -> None:
    with pytest.raises(ZvoltError) as err:
        check_mount_flags(bad)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_mounter_argv_and_parsing() -> None:
    rec = Recorder(
        {
            "findmnt": Result(0, "/stage /dev/nvme1n1 ext4 rw,noatime\n", ""),
            "blkid": Result(0, "DEVNAME=/dev/nvme1n1\nUUID=x\nTYPE=xfs\n", ""),
        }
    )
    m = SystemMounter(runner=rec)
    info = m.mount_info("/stage")
    assert info is not None and (info.source, info.fstype, info.options) == ("/dev/nvme1n1", "ext4", ("rw", "noatime"))
    assert m.fs_type("/dev/nvme1n1") == "xfs"
    m.mount("/dev/nvme1n1", "/stage", "ext4", ["noatime"])
    m.bind("/stage", "/target", readonly=False)  # read-only: test_csi_readonly_bind.py
    m.unmount("/target")
    m.mkfs("/dev/nvme1n1", "xfs")
    m.grow("/dev/nvme1n1", "/target", "ext4")
    m.grow("/dev/nvme1n1", "/target", "xfs")
    assert rec.argvs[2:] == [
        ["mount", "-t", "ext4", "-o", "noatime", "--", "/dev/nvme1n1", "/stage"],
        ["mount", "--bind", "--", "/stage", "/target"],
        ["umount", "--", "/target"],
        ["mkfs.xfs", "-q", "--", "/dev/nvme1n1"],
        ["resize2fs", "--", "/dev/nvme1n1"],
        ["xfs_growfs", "--", "/target"],
    ]
    blank = SystemMounter(runner=Recorder({"blkid": Result(2, "", ""), "findmnt": Result(1, "", "")}))
    assert blank.fs_type("/dev/nvme1n1") is None and blank.mount_info("/x") is None
    parted = SystemMounter(runner=Recorder({"blkid": Result(0, "PTTYPE=gpt\n", "")}))
    assert parted.fs_type("/dev/nvme1n1") == "partition table gpt"
    with pytest.raises(ZvoltError):
        m.mount("/dev/x", "relative", "ext4", [])
    with pytest.raises(ZvoltError):
        m.mkfs("/dev/x", "btrfs")


def test_statvfs_and_block_size(tmp_path: Path) -> None:
    m = SystemMounter(runner=Recorder())
    st = m.stats(str(tmp_path))
    assert st.total_bytes > 0 and 0 <= st.available_bytes <= st.total_bytes and st.total_inodes >= st.free_inodes
    f = tmp_path / "f"
    f.write_bytes(b"x" * 4096)
    assert m.block_size(str(f)) == 4096 and not m.is_block_device(str(f))


def test_host_identity_is_generated_once_and_private(tmp_path: Path) -> None:
    a = load_or_create(tmp_path / "a", "worker-0")
    assert check_nqn(a.hostnqn) == a.hostnqn and "worker-0" in a.hostnqn and a.hostid in a.hostnqn
    assert load_or_create(tmp_path / "a", "renamed") == a  # persistent, not derived
    mode = stat.S_IMODE(os.stat(tmp_path / "a" / "host-identity.json").st_mode)
    assert mode == 0o600
    b = load_or_create(tmp_path / "b", "worker-0")
    assert b.hostnqn != a.hostnqn and b.hostid != a.hostid  # same OS image, distinct identities
    long = load_or_create(tmp_path / "c", "n" * 200)
    assert "n" * 200 not in long.hostnqn and len(long.hostnqn) <= 223
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "host-identity.json").write_text(json.dumps({"hostnqn": "garbage"}))
    with pytest.raises(ZvoltError):
        load_or_create(tmp_path / "d", "worker-0")
