"""Instance lifecycle: up (boot or reuse + guest setup + services), down, status."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lab import guest, guestsetup, kubenode, qemu, qmp, ssh
from lab import state as statefile
from lab.guest import GuestCommandError, Lab
from lab.image import Image, build, current_image
from lab.paths import Cache, source_root
from lab.ssh import SshTarget
from lab.state import RunState

MODULES = ("nvmet", "nvmet-tcp", "nvme-tcp", "nvme-fabrics", "zfs")
BOOT_TIMEOUT = 420.0
DEFAULT_POOL_SIZE = 16 * 1024**3


@dataclass(frozen=True)
class UpOptions:
    memory_mb: int = 4096
    pool_size: int = DEFAULT_POOL_SIZE
    pool_disk: Path | None = None  # reuse: import the pool on it instead of creating one
    services: bool = True
    boot_timeout: float = BOOT_TIMEOUT
    peer: qemu.PeerLink | None = None  # a link to another lab guest (storage side boots first)
    storage_net: qemu.StorageNet | None = None  # a lab cluster's shared storage network (lab/cluster.py)
    node_name: str = guest.NODE_NAME  # the agent's storage node name
    multipath: bool = False  # boot with nvme_core.multipath=Y (a running guest is reused as it is)


class LabError(RuntimeError):
    pass


@contextlib.contextmanager
def instance_lock(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ssh_target(cache: Cache, st: RunState) -> SshTarget:
    # Unix socket paths are short-limited (108 bytes): keep the control socket in /tmp.
    digest = hashlib.sha256(st.run_dir.encode()).hexdigest()[:12]
    ctl = Path("/tmp") / f"zvolt-lab-{os.getuid()}-{digest}-{st.ssh_port}.ctl"
    return SshTarget(port=st.ssh_port, key=cache.ssh_key, control_path=ctl)


def lab_for(cache: Cache, st: RunState) -> Lab:
    return Lab(target=ssh_target(cache, st), forwards=dict(st.forwards), instance=st.instance,
               node_name=st.extra.get("node_name", guest.NODE_NAME))


def storage_net_of(st: RunState) -> qemu.StorageNet | None:
    """The storage network this guest was booted on (kept in the state's extra fields)."""
    port, index = st.extra.get("storage_net_port"), st.extra.get("storage_net_index")
    return qemu.StorageNet(port=int(port), index=int(index)) if port and index else None


def running_state(cache: Cache, instance: str) -> RunState | None:
    st = statefile.load(cache.run_dir(instance))
    if st is None or not qemu.alive(st.pid, str(st.overlay)):
        return None
    return st


def is_running(cache: Cache, instance: str) -> bool:
    st = running_state(cache, instance)
    return st is not None and st.guest_ready


def attach(cache: Cache, instance: str) -> Lab:
    st = running_state(cache, instance)
    if st is None:
        raise LabError(f"lab instance {instance!r} is not running (zvolt-lab up)")
    return lab_for(cache, st)


def _log(out: TextIO, t0: float, msg: str) -> None:
    out.write(f"[lab {time.monotonic() - t0:7.1f}s] {msg}\n")
    out.flush()


@dataclass(frozen=True)
class UpResult:
    lab: Lab
    booted: bool  # False: an already running guest was reused (whoever booted it owns it)


def up(cache: Cache, instance: str, opts: UpOptions, out: TextIO) -> Lab:
    """Boot or reuse the instance's guest and set it up; see up_result for who booted it."""
    return up_result(cache, instance, opts, out).lab


def up_result(cache: Cache, instance: str, opts: UpOptions, out: TextIO) -> UpResult:
    t0 = time.monotonic()
    run_dir = cache.run_dir(instance)
    with instance_lock(run_dir):
        st = running_state(cache, instance)
        booted = st is None
        if st is not None:
            _log(out, t0, f"reusing running guest (qemu pid {st.pid})")
        else:
            image = current_image(cache) or build(cache, out=out)
            st = _boot(cache, instance, run_dir, image, opts, out, t0)
        lab = lab_for(cache, st)
        try:
            try:
                _wait_ssh(lab, st, opts.boot_timeout, t0, out)
            except BootTimeout as exc:
                if not booted:
                    raise
                # A boot that hangs once under TCG is not worth a failed run; one that hangs twice
                # is, and the error says what qemu, the disk and the console said.
                _log(out, t0, f"{exc}: powering it off and booting once more")
                out.write(f"--- last lines of {st.console_log} ---\n{_tail(st.console_log)}\n")
                _stop(cache, run_dir, st, out, timeout=10)
                st = _boot(cache, instance, run_dir, image, opts, out, t0)
                lab = lab_for(cache, st)
                _wait_ssh(lab, st, opts.boot_timeout, t0, out)
            setup_guest(lab, st, out, t0)
            st.guest_ready = True
            statefile.save(run_dir, st)
            if opts.services:
                start_services(lab, out, t0)
        except BaseException:
            out.write(f"--- last lines of {st.console_log} ---\n{_tail(st.console_log)}\n")
            if booted and os.environ.get("ZVOLT_LAB_KEEP") != "1":
                # A guest that failed to come up is not left burning a core (ZVOLT_LAB_KEEP=1 to debug it).
                _stop(cache, run_dir, st, out, timeout=10)
            raise
        return UpResult(lab=lab, booted=booted)


def _boot(
    cache: Cache, instance: str, run_dir: Path, image: Image, opts: UpOptions, out: TextIO, t0: float
) -> RunState:
    old = statefile.load(run_dir)
    if old is not None:
        _cleanup_files(old)
    overlay = run_dir / "overlay.qcow2"
    overlay.unlink(missing_ok=True)
    _check_free_space(run_dir)
    subprocess.run(qemu.overlay_argv(image.rootfs, overlay), check=True, timeout=60, stdin=subprocess.DEVNULL)
    if opts.pool_disk is not None:
        pool_disk, reused = opts.pool_disk.resolve(), True
        if not pool_disk.exists():
            raise LabError(f"pool disk {pool_disk} does not exist")
    else:
        pool_disk, reused = run_dir / "pool.img", False
        pool_disk.unlink(missing_ok=True)
        qemu.make_sparse(pool_disk, opts.pool_size)
    ssh_port = qemu.free_port()
    forwards = {name: qemu.free_port() for name in guest.GUEST_PORTS}
    console = run_dir / "console.log"
    console.unlink(missing_ok=True)
    qmp_socket = run_dir / "qmp.sock"
    qmp_socket.unlink(missing_ok=True)
    cfg = qemu.QemuConfig(
        name=instance, kernel=image.kernel, initrd=image.initrd, overlay=overlay, pool_disk=pool_disk,
        src=source_root(), console_log=console, pid_file=run_dir / "qemu.pid", ssh_port=ssh_port,
        forwards={forwards[n]: guest.GUEST_PORTS[n] for n in forwards}, memory_mb=opts.memory_mb,
        peer=opts.peer, storage_net=opts.storage_net, guestfwds=(kubenode.apiserver_guestfwd(run_dir),),
        multipath=opts.multipath, qmp_socket=qmp_socket,
    )
    pid = qemu.start(cfg)
    st = RunState(
        instance=instance, pid=pid, ssh_port=ssh_port, forwards=forwards, image=str(image.dir),
        run_dir=str(run_dir), pool_disk=str(pool_disk), pool_disk_reused=reused, memory_mb=opts.memory_mb,
        started=time.time(), peer_role=opts.peer.role if opts.peer else "",
        peer_port=opts.peer.port if opts.peer else 0,
    )
    if opts.node_name != guest.NODE_NAME:
        st.extra["node_name"] = opts.node_name
    if opts.storage_net is not None:
        st.extra["storage_net_port"] = str(opts.storage_net.port)
        st.extra["storage_net_index"] = str(opts.storage_net.index)
    statefile.save(run_dir, st)
    _log(out, t0, f"qemu started (pid {pid}, image {image.dir.name})")
    return st


# A probe takes up to ~22 s (20 s ssh timeout + 2 s pause), so noting every 10 s keeps the
# gaps between lines under 30 s while the guest boots.
BOOT_NOTE_EVERY = 10.0
# What a lab session writes beside the image: the overlay (guest packages, container images,
# logs) and the sparse pool disk as ZFS fills it.
MIN_FREE_BYTES = 3 << 30
# qemu run states that no amount of waiting turns into a booted guest.
STUCK_STATES = {"io-error": "qemu paused the guest on a disk write it could not store",
                "internal-error": "qemu stopped the guest on an internal error",
                "guest-panicked": "the guest kernel panicked",
                "shutdown": "the guest shut down"}


class BootTimeout(LabError):
    """The guest kept running but never answered ssh: the one boot failure worth a second boot."""


def _check_free_space(run_dir: Path) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        raise LabError(
            f"only {free >> 20} MiB free on the filesystem of {run_dir}; a lab guest needs "
            f"{MIN_FREE_BYTES >> 30} GiB for its disk overlay and pool (qemu pauses a guest whose "
            "disk write finds no space, which looks like a boot that never ends)"
        )


def _boot_diagnosis(st: RunState) -> str:
    """One line on why a guest is not answering: qemu's own state, the space left, the console's last words."""
    status = qmp.status(st.qmp_socket)
    free = shutil.disk_usage(st.run_dir).free >> 20
    last = [line.strip() for line in _tail(st.console_log, 3).splitlines() if line.strip()]
    return (f"qemu status {status or 'unknown'}; {free} MiB free on the filesystem of {st.run_dir}; "
            f"console ends: {' | '.join(last)[-300:] or '(empty)'}")


def _wait_ssh(lab: Lab, st: RunState, timeout: float, t0: float, out: TextIO) -> None:
    start = time.monotonic()
    deadline = start + timeout
    said = start
    while True:
        if time.monotonic() - said >= BOOT_NOTE_EVERY:
            said = time.monotonic()
            _log(out, t0, f"guest still booting ({said - start:.0f}s; TCG boots take 1-3 minutes)")
        if not qemu.alive(st.pid, str(st.overlay)):
            raise LabError(f"qemu (pid {st.pid}) exited during boot; {_boot_diagnosis(st)}")
        status = qmp.status(st.qmp_socket)
        if status in STUCK_STATES:
            raise LabError(f"{STUCK_STATES[status]}; {_boot_diagnosis(st)}")
        try:
            lab.run(["true"], timeout=20)
            break
        except GuestCommandError as exc:
            if time.monotonic() > deadline:
                raise BootTimeout(f"guest did not answer ssh within {timeout:.0f}s; {_boot_diagnosis(st)}") from exc
            time.sleep(2)
    _log(out, t0, f"guest answers ssh on 127.0.0.1:{st.ssh_port}")


def peer_config(role: str) -> dict[str, Any] | None:
    """How guest setup wires the peer NIC: storage side into the storage netns, worker side in the
    root netns with a route to the storage address across the link."""
    if not role:
        return None
    cfg: dict[str, Any] = {"mac": qemu.PEER_MAC[role], "dev": guest.PEER_DEV,
                           "address": f"{guest.PEER_IP[role]}/{guest.PREFIX_LEN}", "netns": "", "route": []}
    if role == "storage":
        cfg["netns"] = guest.STORAGE_NS
    else:
        cfg["route"] = [f"{guest.STORAGE_IP}/32", guest.PEER_IP["storage"]]
    return cfg


def storage_net_config(net: qemu.StorageNet | None) -> dict[str, Any] | None:
    """How guest setup wires the storage network NIC: into the storage netns, where the agent runs."""
    if net is None:
        return None
    return {"mac": net.mac, "dev": guest.STORAGE_NET_DEV, "netns": guest.STORAGE_NS, "route": [],
            "address": f"{guest.storage_net_ip(net.index)}/{guest.PREFIX_LEN}"}


def setup_config(st: RunState) -> dict[str, Any]:
    return {
        "modules": list(MODULES),
        "pool": guest.POOL,
        "pool_device": "/dev/vdb",
        # Once set up, the disk holds our pool: after a guest reboot it is imported, never re-created.
        "pool_reused": st.pool_disk_reused or st.guest_ready,
        "peer": peer_config(st.peer_role),
        "storage_net": storage_net_config(storage_net_of(st)),
        "storage_ns": guest.STORAGE_NS, "worker_ns": guest.WORKER_NS,
        "storage_dev": guest.VETH_STORAGE, "worker_dev": guest.VETH_WORKER,
        "storage_ip": guest.STORAGE_IP, "worker_ip": guest.WORKER_IP, "prefix_len": guest.PREFIX_LEN,
        "run_dir": guest.RUN_DIR,
        "forwarders": [
            [guest.unit_name(f"fwd-{name}"), guest.systemd_run_argv(
                f"fwd-{name}", ["socat", f"TCP-LISTEN:{port},fork,reuseaddr", f"UNIX-CONNECT:{guest.SOCKETS[name]}"])]
            for name, port in guest.GUEST_PORTS.items()
        ],
    }


def setup_guest(lab: Lab, st: RunState, out: TextIO, t0: float) -> None:
    """Idempotent: modules, configfs, /src, pool, namespaces + veth, socat forwarders (one ssh call)."""
    script = Path(guestsetup.__file__).read_text()
    cfg = setup_config(st)
    if cfg["pool_reused"]:
        _log(out, t0, "guest setup: importing the kept pool disk first (slow for big pools under TCG)")
    res = lab.run(["python3", "-", json.dumps(cfg)], input=script, timeout=guestsetup.IMPORT_TIMEOUT_S + 600)
    for line in res.stdout.splitlines():
        _log(out, t0, line)


def start_services(lab: Lab, out: TextIO, t0: float) -> None:
    src = source_root()
    wanted = []
    if (src / "agent" / "main.py").exists():
        wanted.append(("agent", lab.start_agent))
    if (src / "csi" / "main.py").exists():
        wanted += [("controller", lab.start_controller), ("node", lab.start_node)]
    if not wanted:
        _log(out, t0, "no services in the tree yet (agent/main.py, csi/main.py)")
    for name, start in wanted:
        if lab.service_running(name):
            _log(out, t0, f"{name} already running")
            continue
        start()
        _log(out, t0, f"{name} started")


def boot_id(lab: Lab) -> str:
    return lab.run(["cat", "/proc/sys/kernel/random/boot_id"], timeout=30).stdout.strip()


@dataclass(frozen=True)
class RebootResult:
    lab: Lab
    down_seconds: float   # reset -> guest answers ssh again
    setup_seconds: float  # guest setup after the boot (modules, pool import, netns, peer link)


def reboot(cache: Cache, instance: str, out: TextIO, timeout: float = BOOT_TIMEOUT) -> RebootResult:
    """Hard reset of a running guest: sysrq 'b' reboots at once, with no sync and no clean
    shutdown, as a power cut or a kernel panic would. qemu keeps running (same overlay, same pool
    disk), the guest boots again and gets the same setup as `up` (its pool is imported, never
    re-created). Services are not started: after a reboot, starting them is the caller's test."""
    t0 = time.monotonic()
    run_dir = cache.run_dir(instance)
    with instance_lock(run_dir):
        st = running_state(cache, instance)
        if st is None or not st.guest_ready:
            raise LabError(f"lab instance {instance!r} is not running (zvolt-lab up)")
        lab = lab_for(cache, st)
        before = boot_id(lab)
        # From a timer a second later, so this ssh call returns cleanly instead of stalling until
        # ssh notices the guest is gone (its keepalives take ~15 s).
        lab.run(["systemd-run", "--on-active=1", "--timer-property=AccuracySec=10ms", "--quiet",
                 "python3", "-c", "open('/proc/sysrq-trigger', 'w').write('b')"], timeout=30)
        reset = time.monotonic() + 1.0
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            ssh.close_master(lab.target)
        _log(out, t0, "guest reset (sysrq b) armed")
        deadline = reset + timeout
        while True:  # the old boot may still answer for a moment (a timer late under TCG)
            time.sleep(2.0)
            if not qemu.alive(st.pid, str(st.overlay)):
                raise LabError(f"qemu (pid {st.pid}) exited during the reboot")
            with contextlib.suppress(GuestCommandError):
                if boot_id(lab) != before:
                    break
            if time.monotonic() > deadline:
                raise LabError(f"the guest did not come back from the reset within {timeout:.0f}s")
        up_at = time.monotonic()
        _log(out, t0, f"guest answers ssh again (new boot) on 127.0.0.1:{st.ssh_port}")
        setup_guest(lab, st, out, t0)
        return RebootResult(lab=lab, down_seconds=up_at - reset, setup_seconds=time.monotonic() - up_at)


def describe(cache: Cache, st: RunState, lab: Lab) -> str:
    lines = [
        f"instance   {st.instance} (qemu pid {st.pid}, {st.memory_mb} MiB, image {Path(st.image).name})",
        f"ssh        ssh -i {cache.ssh_key} -p {st.ssh_port} -o StrictHostKeyChecking=no "
        "-o UserKnownHostsFile=/dev/null root@127.0.0.1",
        f"console    {st.console_log}",
        f"pool       {guest.POOL} on /dev/vdb = {st.pool_disk}{' (reused)' if st.pool_disk_reused else ''}",
        f"netns      {guest.STORAGE_NS} {guest.STORAGE_IP}  <->  {guest.WORKER_NS} {guest.WORKER_IP}",
    ]
    net = storage_net_of(st)
    if net is not None:
        lines.append(f"storage    node {lab.node_name}, {guest.STORAGE_NET_DEV} {guest.storage_net_ip(net.index)} "
                     f"in netns {guest.STORAGE_NS} (cluster segment {qemu.STORAGE_NET_GROUP}:{net.port})")
    for name, port in sorted(st.forwards.items()):
        lines.append(f"{name:<10} grpc 127.0.0.1:{port} -> guest {guest.SOCKETS[name]}"
                     f"  (log: zvolt-lab run -- journalctl -u {guest.unit_name(name)})")
    return "\n".join(lines)


def down(cache: Cache, instance: str, out: TextIO, timeout: float = 30.0) -> bool:
    """Clean poweroff, then SIGTERM/SIGKILL by pid. True if a guest was running."""
    run_dir = cache.run_dir(instance)
    with instance_lock(run_dir):
        st = statefile.load(run_dir)
        if st is None:
            return False
        return _stop(cache, run_dir, st, out, timeout)


def _stop(cache: Cache, run_dir: Path, st: RunState, out: TextIO, timeout: float) -> bool:
    """The instance lock is held by the caller."""
    was = qemu.alive(st.pid, str(st.overlay))
    target = ssh_target(cache, st)
    if was:
        if st.pool_disk_reused:
            # The pool disk outlives this guest: leave the pool exported and consistent.
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(ssh.command_argv(target, ["zpool", "export", guest.POOL], timeout=120),
                               capture_output=True, timeout=140, stdin=subprocess.DEVNULL, check=False)
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(ssh.command_argv(target, ["systemctl", "poweroff", "--no-block"], timeout=10),
                           capture_output=True, timeout=20, stdin=subprocess.DEVNULL, check=False)
        if qemu.wait_exit(st.pid, str(st.overlay), timeout):
            out.write(f"guest powered off (qemu pid {st.pid})\n")
        else:
            out.write(f"guest did not power off in {timeout:.0f}s: killing qemu pid {st.pid}\n")
            qemu.kill(st.pid, str(st.overlay))
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        ssh.close_master(target)
    _cleanup_files(st)
    statefile.clear(run_dir)
    return was


def _cleanup_files(st: RunState) -> None:
    if qemu.alive(st.pid, str(st.overlay)):
        raise LabError(f"qemu pid {st.pid} still running")
    st.overlay.unlink(missing_ok=True)
    st.qmp_socket.unlink(missing_ok=True)
    if not st.pool_disk_reused:
        Path(st.pool_disk).unlink(missing_ok=True)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console log)"
