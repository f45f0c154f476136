"""zvolt-lab command line: build, up, run, down, status, reboot, oci-image."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from lab import control, qemu, ssh
from lab import state as statefile
from lab.guest import GuestCommandError
from lab.paths import Cache, instance_from_env
from lab.steps import StepFailed

SIZE_SUFFIX = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t and t[-1] in SIZE_SUFFIX:
        return int(float(t[:-1]) * SIZE_SUFFIX[t[-1]])
    return int(t)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zvolt-lab",
        description="The zvolt lab: real ZFS + nvmet + NVMe/TCP in a qemu guest. "
        "Instance from $ZVOLT_LAB_NAME (default 'default'), cache in $ZVOLT_LAB_CACHE or ~/.cache/zvolt-lab.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the cached guest image")
    b.add_argument("--force", action="store_true", help="rebuild the image even if it is cached")
    u = sub.add_parser("up", help="boot the guest (or reuse a running one), set it up, start services")
    u.add_argument("--memory", type=int, help="guest memory in MiB (default 4096; 2048 per guest of a cluster)")
    u.add_argument("--pool-size", type=parse_size, default=control.DEFAULT_POOL_SIZE,
                   help="size of the fresh sparse pool disk (default 16G)")
    u.add_argument("--pool-disk", help="reuse this pool disk image: import its pool instead of creating one")
    u.add_argument("--no-services", action="store_true", help="do not start agent/controller/node")
    u.add_argument("--boot-timeout", type=float, default=control.BOOT_TIMEOUT)
    u.add_argument("--multipath", action="store_true",
                   help="boot with native NVMe multipath on (nvme_core.multipath=Y), as a live move needs")
    u.add_argument("--storage-nodes", type=int, default=1, help="boot a cluster of this many storage guests "
                   "(instances NAME, NAME2, NAME3), each with its own pool and agent, on one storage network")
    r = sub.add_parser("run", help="run a command in the guest: zvolt-lab run [--netns NS] -- CMD...")
    r.add_argument("--netns", help="run inside this network namespace (storage, worker)")
    r.add_argument("--timeout", type=float, default=600, help="seconds before the command is killed (default 600)")
    r.add_argument("command", nargs=argparse.REMAINDER)
    d = sub.add_parser("down", help="power the guest off (hard-kill qemu if it does not stop in time)")
    d.add_argument("--timeout", type=float, default=30, help="seconds to wait for a clean poweroff")
    d.add_argument("--cluster", action="store_true", help="also the other guests of a cluster (NAME2, NAME3)")
    sub.add_parser("status", help="what runs where")
    rb = sub.add_parser("reboot", help="hard-reset the guest (sysrq b, no sync), set it up again, start services")
    rb.add_argument("--no-services", action="store_true", help="do not start agent/controller/node afterwards")
    o = sub.add_parser("oci-image", help="build the zvolt container image from Dockerfile with buildah "
                       "(cache in $ZVOLT_IMAGE_CACHE or ~/.cache/zvolt-image) and export it as an OCI archive")
    o.add_argument("--output", help="OCI archive to write (default <cache>/zvolt-oci.tar)")
    o.add_argument("--tag", help="image name (default: the chart's image.repository:appVersion)")
    o.add_argument("--storage-driver", choices=("overlay", "vfs"), help="default: overlay where it works, else vfs")
    o.add_argument("--refresh-base", action="store_true", help="make the Debian base image again (new packages)")
    o.add_argument("--all", action="store_true", help="also the images a lab kubelet runs: pause, the chart's "
                   "sidecars (binaries from $ZVOLT_K8S_BIN) and postgres, one archive each in <cache>/node-images")
    return p


def _terminate(signum: int, frame: object) -> None:
    # SystemExit unwinds through `finally`: chroot mounts are undone, child process groups killed.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    cache = Cache.from_env()
    instance = instance_from_env()
    try:
        if args.cmd == "build":
            from lab.image import build

            t0 = time.monotonic()
            img = build(cache, force=args.force)
            print(f"image {img.dir} (kernel {img.versions.kernel}, zfs {img.versions.zfs}) "
                  f"in {time.monotonic() - t0:.1f}s")
            return 0
        if args.cmd == "oci-image":
            return oci_image(args)
        if args.cmd == "up":
            from pathlib import Path

            if args.storage_nodes != 1:
                return up_cluster(cache, instance, args)
            opts = control.UpOptions(
                memory_mb=args.memory or 4096, pool_size=args.pool_size,
                pool_disk=Path(args.pool_disk) if args.pool_disk else None,
                services=not args.no_services, boot_timeout=args.boot_timeout, multipath=args.multipath,
            )
            t0 = time.monotonic()
            lab = control.up(cache, instance, opts, sys.stdout)
            st = control.running_state(cache, instance)
            assert st is not None
            print(f"ready in {time.monotonic() - t0:.1f}s")
            print(control.describe(cache, st, lab))
            return 0
        if args.cmd == "run":
            return run(cache, instance, args.command, args.netns, args.timeout)
        if args.cmd == "down" and args.cluster:
            from lab import cluster

            if not cluster.down_all(cache, instance, sys.stdout):
                print(f"no guest of lab cluster {instance!r} was running")
            return 0
        if args.cmd == "down":
            if not control.down(cache, instance, sys.stdout, timeout=args.timeout):
                print(f"lab instance {instance!r} was not running")
            return 0
        if args.cmd == "status":
            return status(cache, instance)
        if args.cmd == "reboot":
            t0 = time.monotonic()
            res = control.reboot(cache, instance, sys.stdout)
            if not args.no_services:
                control.start_services(res.lab, sys.stdout, t0)
            print(f"rebooted: back on ssh after {res.down_seconds:.1f}s, set up in {res.setup_seconds:.1f}s")
            return 0
    except StepFailed as exc:
        print(f"zvolt-lab: {exc}", file=sys.stderr)
        return 1
    except (control.LabError, GuestCommandError, RuntimeError, ValueError) as exc:
        print(f"zvolt-lab: {exc}", file=sys.stderr)
        return 1
    return 2


def up_cluster(cache: Cache, instance: str, args: argparse.Namespace) -> int:
    from lab import cluster

    if args.pool_disk:
        raise ValueError("--pool-disk is for one guest; a cluster's guests each make their own pool")
    opts = control.UpOptions(memory_mb=args.memory or cluster.CLUSTER_MEMORY_MB, pool_size=args.pool_size,
                             services=not args.no_services, boot_timeout=args.boot_timeout,
                             multipath=args.multipath)
    t0 = time.monotonic()
    members = cluster.up(cache, instance, args.storage_nodes, opts, sys.stdout)
    print(f"cluster ready in {time.monotonic() - t0:.1f}s")
    for m, (node, ip) in zip(members, cluster.storage_ips(members).items(), strict=True):
        print(f"{m.instance:<10} storage node {node}, storage network {ip}, agent grpc "
              f"{m.lab.grpc_target('agent')} (ZVOLT_LAB_NAME={m.instance} zvolt-lab run ...)")
    return 0


def oci_image(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lab import oci_image as oci
    from lab.paths import source_root

    t0 = time.monotonic()
    built = oci.build(oci.ImageCache.from_env(), source_root(), sys.stdout, tag=args.tag,
                      archive=Path(args.output).resolve() if args.output else None,
                      driver=args.storage_driver, refresh_base=args.refresh_base)
    layers = " + ".join(f"{size / 1e6:.1f}" for size in built.layers)
    print(f"image {built.tag} ({built.image_id[:12]}): {built.size / 1e6:.0f} MB ({layers} MB layers), "
          f"built in {built.build_seconds:.1f}s; OCI archive {built.archive} {built.archive_size / 1e6:.0f} MB; "
          f"{time.monotonic() - t0:.1f}s in all")
    if args.all:
        from lab import node_images

        t0 = time.monotonic()
        built_nodes = node_images.build(oci.ImageCache.from_env(), source_root(), sys.stdout,
                                        driver=args.storage_driver, refresh_base=args.refresh_base)
        for image in built_nodes.images:
            print(f"image {' '.join(image.refs)} ({image.image_id[:12]}): {image.size / 1e6:.1f} MB; "
                  f"OCI archive {image.archive} {image.archive_size / 1e6:.1f} MB")
        for line in built_nodes.skipped:
            print(f"skipped: {line}")
        helm_set = ",".join(f"{k}={v}" for image in built_nodes.images for k, v in image.helm_set.items())
        if helm_set:
            print(f"the chart pins other sidecar versions: helm install --set {helm_set}")
        print(f"listed in {built_nodes.manifest}; {time.monotonic() - t0:.1f}s")
    return 0


def run(cache: Cache, instance: str, command: list[str], netns: str | None, timeout: float) -> int:
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("zvolt-lab run: no command (zvolt-lab run -- CMD...)", file=sys.stderr)
        return 2
    lab = control.attach(cache, instance)
    ssh.ensure_master(lab.target)
    argv = ssh.command_argv(lab.target, command, netns=netns, timeout=timeout)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)  # output streams straight through
    try:
        rc = proc.wait(timeout=timeout + ssh.HOST_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"zvolt-lab run: timed out after {timeout:.0f}s", file=sys.stderr)
        return 124
    if rc == 124:
        print(f"zvolt-lab run: command timed out after {timeout:.0f}s (guest-side)", file=sys.stderr)
    return rc


def status(cache: Cache, instance: str) -> int:
    st = statefile.load(cache.run_dir(instance))
    if st is None:
        print(f"lab instance {instance!r}: not running")
        return 3
    if not qemu.alive(st.pid, str(st.overlay)):
        print(f"lab instance {instance!r}: stale state (qemu pid {st.pid} gone); run zvolt-lab down to clean up")
        return 3
    lab = control.lab_for(cache, st)
    print(control.describe(cache, st, lab))
    try:
        lab.run(["true"], timeout=15)
        answers = "yes"
    except GuestCommandError as exc:
        answers = f"no ({exc})"
    print(f"ssh        answers: {answers}; setup done: {st.guest_ready}")
    if answers == "yes":
        for name in ("agent", "controller", "node"):
            print(f"service    {name}: {'running' if lab.service_running(name) else 'not running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
