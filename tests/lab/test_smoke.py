"""The lab's own end-to-end check of the kernel stack, without any zvolt component.

zvol → snapshot → clone → nvmet export (configfs written directly) → nvme connect from the
worker namespace → the clone's content over NVMe/TCP → mkfs → write → remount → read back,
then teardown in the only safe order (lab.md): disconnect → unlink port → disable namespace
→ rmdir namespace → rmdir subsystem → destroy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time

import pytest

from lab.guest import GuestCommandError, Lab

pytestmark = pytest.mark.lab

NVMET = "/sys/kernel/config/nvmet"


def write_attr(lab: Lab, path: str, value: str) -> None:
    lab.run(["tee", path], input=value)


def wait_for(lab: Lab, path: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while lab.run(["test", "-e", path], check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout:.0f}s")
        lab.run(["udevadm", "settle", "-t", "5"], check=False)


def destroy(lab: Lab, dataset: str) -> None:
    """New zvols are briefly held open by udev (EBUSY): settle and retry."""
    for _ in range(10):
        if lab.run(["zfs", "list", "-H", "-o", "name", dataset], check=False).returncode != 0:
            return
        lab.run(["udevadm", "settle", "-t", "10"], check=False)
        if lab.run(["zfs", "destroy", dataset], check=False).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"could not destroy {dataset}")


def controller_for(lab: Lab, nqn: str) -> str | None:
    code = (
        "import glob, json\n"
        "hits = [p.split('/')[-2] for p in glob.glob('/sys/class/nvme/nvme*/subsysnqn')\n"
        f"        if open(p).read().strip() == {nqn!r}]\n"
        "print(json.dumps(hits))\n"
    )
    hits = json.loads(lab.py(code).stdout)
    return hits[0] if hits else None


def test_zvol_clone_exported_over_nvme_tcp_round_trips_bytes(lab: Lab) -> None:
    uid = secrets.token_hex(4)
    base, snap, clone = f"{lab.pool}/smoke-{uid}", f"{lab.pool}/smoke-{uid}@s1", f"{lab.pool}/smoke-{uid}-c"
    nqn = f"nqn.2026-11.io.zvolt:lab-smoke:{uid}"
    port_id = str(20000 + int(uid, 16) % 40000)
    svc = str(4600 + int(uid, 16) % 300)
    subsys, port = f"{NVMET}/subsystems/{nqn}", f"{NVMET}/ports/{port_id}"
    mnt = f"/mnt/smoke-{uid}"
    pattern = os.urandom(1 << 20)
    payload = os.urandom(256 << 10)
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    def mark(name: str) -> None:
        timings[name] = round(time.monotonic() - t0, 2)

    try:
        lab.run(["zfs", "create", "-s", "-V", "256M", "-o", "volmode=dev", base])
        wait_for(lab, f"/dev/zvol/{base}")
        lab.py(
            f"import base64, os\nwith open({'/dev/zvol/' + base!r}, 'r+b') as f:\n"
            f"    f.write(base64.b64decode({base64.b64encode(pattern).decode()!r}))\n"
            "    f.flush()\n    os.fsync(f.fileno())\n"
        )
        lab.run(["zfs", "snapshot", snap])
        lab.run(["zfs", "clone", "-o", "volmode=dev", snap, clone])
        wait_for(lab, f"/dev/zvol/{clone}")
        mark("zfs")

        lab.run(["mkdir", subsys])
        write_attr(lab, f"{subsys}/attr_allow_any_host", "1")
        lab.run(["mkdir", f"{subsys}/namespaces/1"])
        write_attr(lab, f"{subsys}/namespaces/1/device_path", f"/dev/zvol/{clone}")
        write_attr(lab, f"{subsys}/namespaces/1/enable", "1")
        lab.run(["mkdir", port])
        for attr, value in (("trtype", "tcp"), ("adrfam", "ipv4"), ("traddr", lab.storage_ip), ("trsvcid", svc)):
            write_attr(lab, f"{port}/addr_{attr}", value)
        # The listener lives in the netns of the process that links the subsystem to the port.
        lab.run(["ln", "-s", subsys, f"{port}/subsystems/{nqn}"], netns="storage")
        mark("nvmet export")

        lab.run(["nvme", "connect", "-t", "tcp", "-a", lab.storage_ip, "-s", svc, "-n", nqn], netns="worker")
        ctrl = None
        deadline = time.monotonic() + 30
        while ctrl is None and time.monotonic() < deadline:
            ctrl = controller_for(lab, nqn)
        assert ctrl, f"no nvme controller for {nqn} after connect"
        dev = f"/dev/{ctrl}n1"
        wait_for(lab, dev)
        mark("nvme connect")

        # Binary output is not text-safe over run(): compare a digest computed in the guest.
        digest = lab.py(
            f"import hashlib\nprint(hashlib.sha256(open({dev!r}, 'rb').read(1 << 20)).hexdigest())\n"
        ).stdout.strip()
        assert digest == hashlib.sha256(pattern).hexdigest(), "the clone seen over NVMe/TCP differs from its origin"

        lab.run(["mkfs.ext4", "-q", "-F", dev], timeout=120)
        lab.run(["mkdir", "-p", mnt])
        lab.run(["mount", dev, mnt])
        lab.py(
            f"import base64, os\nwith open({mnt + '/payload'!r}, 'wb') as f:\n"
            f"    f.write(base64.b64decode({base64.b64encode(payload).decode()!r}))\n"
            "    f.flush()\n    os.fsync(f.fileno())\n"
        )
        lab.run(["umount", mnt])
        lab.run(["mount", dev, mnt])
        back = base64.b64decode(lab.run(["base64", "-w0", f"{mnt}/payload"]).stdout)
        assert back == payload, "bytes read back over NVMe/TCP differ from what was written"
        mark("mkfs+write+read")
    finally:
        teardown(lab, mnt=mnt, nqn=nqn, subsys=subsys, port=port, datasets=[clone, snap, base])
        mark("teardown")
    print(f"smoke timings (s, cumulative): {timings}")
    assert lab.run(["zfs", "list", "-H", "-o", "name", base], check=False).returncode != 0
    assert lab.run(["test", "-e", subsys], check=False).returncode != 0


def teardown(lab: Lab, *, mnt: str, nqn: str, subsys: str, port: str, datasets: list[str]) -> None:
    """Every step runs even if an earlier one failed; the order is the point."""
    errors: list[str] = []

    def step(argv: list[str], netns: str | None = None, value: str | None = None) -> None:
        try:
            res = lab.run(argv, netns=netns, check=False, timeout=60, input=value)
            if res.returncode != 0 and argv[0] not in ("rmdir", "nvme"):
                errors.append(f"{argv}: exit {res.returncode}: {res.stderr.strip()}")
        except GuestCommandError as exc:
            errors.append(str(exc))

    if lab.run(["mountpoint", "-q", mnt], check=False).returncode == 0:
        step(["umount", mnt])
    step(["rmdir", mnt])
    step(["nvme", "disconnect", "-n", nqn], netns="worker")
    step(["rm", "-f", f"{port}/subsystems/{nqn}"])
    if lab.run(["test", "-e", f"{subsys}/namespaces/1/enable"], check=False).returncode == 0:
        step(["tee", f"{subsys}/namespaces/1/enable"], value="0")
        step(["rmdir", f"{subsys}/namespaces/1"])
    step(["rmdir", subsys])
    step(["rmdir", port])
    for ds in datasets:
        if "@" in ds:
            if lab.run(["zfs", "list", "-H", "-t", "snapshot", ds], check=False).returncode == 0:
                step(["zfs", "destroy", ds])
        else:
            destroy(lab, ds)
    assert not errors, errors
