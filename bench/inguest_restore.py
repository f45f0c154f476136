"""In-guest helpers of the restore suite: `python -m bench.inguest_restore <command> '<json args>'`.

The bench's volumes are made and published through the agent's own gRPC API (its unix socket, next
to the kernel), several at once: a publish is a `zfs set volmode=dev`, a wait for the device node
and the configfs writes, and concurrent sync tasks share a transaction group. Volume names are
`<prefix>-<i:07d>`; their ids (and so datasets and NQNs) follow from the name (`zvolt.names.
id_for_name`), so no command needs a list of thousands of names on its command line.

`restart` stops the agent, optionally empties this node's nvmet configfs (what a reboot leaves:
no subsystem, no host group, no port) and optionally takes the bench volumes' device nodes away
(`volmode=none`, after their namespaces are gone: lab.md), then times the agent's start to ready
with `bench.inguest agent-restart`. Each command prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.inguest import NVMET, _run, _settle, agent_restart
from zvolt.names import check_dataset, check_id, check_nqn, id_for_name, subsystem_nqn

MiB = 1 << 20
SET_BATCH = 100  # datasets per `zfs set` when the bench itself changes volmode


def volume_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:07d}"


def volume_id(prefix: str, i: int) -> str:
    return id_for_name(volume_name(prefix, i))


def node_prefix(node: str) -> str:
    """The NQN prefix of every subsystem the agent of storage node `node` makes."""
    return subsystem_nqn(node, "x")[:-1]


def _check_prefix(prefix: str) -> str:
    check_id(prefix.replace("-", ""), "volume name prefix")
    return prefix


def _stub(socket: str) -> tuple[Any, Any, Any]:
    import grpc

    from zvolt.pb import agent_pb2, agent_pb2_grpc

    if not socket.startswith("/run/zvolt/") or ".." in socket:
        raise ValueError(f"socket {socket!r}")
    ch = grpc.insecure_channel(f"unix://{socket}")
    return ch, agent_pb2_grpc.AgentStub(ch), agent_pb2


def _timed(fn: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def populate(a: dict[str, Any]) -> dict[str, Any]:
    """Create volumes [start, start+count) through the agent and publish each to one of `hosts`."""
    prefix = _check_prefix(a["prefix"])
    import grpc

    start, count = int(a["start"]), int(a["count"])
    size = int(a.get("size_bytes", 16 * MiB))
    hosts = [check_nqn(h) for h in a["hosts"]]
    ch, stub, pb = _stub(a["socket"])
    t0 = time.perf_counter()

    retried: list[str] = []

    def one(i: int) -> tuple[float, float]:
        name = volume_name(prefix, i)
        req = pb.CreateVolumeRequest(name=name, size_bytes=size)
        created = _timed(stub.CreateVolume, req, timeout=600)
        vid = id_for_name(name)
        pub = pb.PublishVolumeRequest(volume_id=vid, host_nqn=hosts[i % len(hosts)])
        for attempt in range(5):
            try:
                return created, _timed(stub.PublishVolume, pub, timeout=600)
            except grpc.RpcError as e:
                # Seen under load: INTERNAL "[Errno 512] Unknown error 512" (ERESTARTSYS from the
                # namespace enable while other zvols are being created). CSI's attacher retries
                # ControllerPublish; so does the bench, and it reports every retry.
                if e.code() != grpc.StatusCode.INTERNAL or attempt == 4:
                    raise
                retried.append(f"{vid}: {e.details()}")
                time.sleep(1.0)
        raise AssertionError("unreachable")

    try:
        with ThreadPoolExecutor(max_workers=max(1, int(a.get("workers", 4)))) as pool:
            done = list(pool.map(one, range(start, start + count)))
    finally:
        ch.close()
    return {"count": count, "seconds": time.perf_counter() - t0, "publish_retries": retried,
            "create_s": [c for c, _ in done], "publish_s": [p for _, p in done]}


def ops(a: dict[str, Any]) -> dict[str, Any]:
    """Publish and unpublish of fresh volumes one at a time, at the current number of exports.

    Each sample: CreateVolume (not timed), PublishVolume (first host: activates the volume),
    PublishVolume again (idempotent: checks the export is whole), UnpublishVolume (last host:
    deactivates it), DeleteVolume (not timed)."""
    prefix = _check_prefix(a["prefix"])
    host = check_nqn(a["host"])
    size = int(a.get("size_bytes", 16 * MiB))
    ch, stub, pb = _stub(a["socket"])
    out: dict[str, list[float]] = {"publish_s": [], "republish_s": [], "unpublish_s": []}
    try:
        for i in range(int(a["count"])):
            name = f"{prefix}-ops-{i:03d}"
            stub.CreateVolume(pb.CreateVolumeRequest(name=name, size_bytes=size), timeout=600)
            vid = id_for_name(name)
            pub = pb.PublishVolumeRequest(volume_id=vid, host_nqn=host)
            unpub = pb.UnpublishVolumeRequest(volume_id=vid, host_nqn=host)
            try:
                out["publish_s"].append(_timed(stub.PublishVolume, pub, timeout=600))
                out["republish_s"].append(_timed(stub.PublishVolume, pub, timeout=600))
                out["unpublish_s"].append(_timed(stub.UnpublishVolume, unpub, timeout=600))
            finally:
                stub.UnpublishVolume(unpub, timeout=600)  # no-op unless a step above failed
                _delete(stub, pb, vid)
    finally:
        ch.close()
    return out


def _delete(stub: Any, pb: Any, vid: str) -> None:
    """DeleteVolume, retried a few times: a fresh zvol can be busy in udev for a moment (lab.md)."""
    import grpc

    for attempt in range(10):
        try:
            stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=600)
            return
        except grpc.RpcError as e:
            if attempt == 9 or e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                                grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            time.sleep(0.5)


def teardown(a: dict[str, Any]) -> dict[str, Any]:
    """Unpublish and delete volumes [start, start+count) through the agent (missing ones are fine)."""
    import grpc

    prefix = _check_prefix(a["prefix"])
    start, count = int(a["start"]), int(a["count"])
    hosts = [check_nqn(h) for h in a["hosts"]]
    ch, stub, pb = _stub(a["socket"])
    t0 = time.perf_counter()

    def one(i: int) -> tuple[float, float]:
        vid = volume_id(prefix, i)
        req = pb.UnpublishVolumeRequest(volume_id=vid, host_nqn=hosts[i % len(hosts)])
        try:
            unpublished = _timed(stub.UnpublishVolume, req, timeout=600)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return 0.0, 0.0
        return unpublished, _timed(_delete, stub, pb, vid)

    try:
        with ThreadPoolExecutor(max_workers=max(1, int(a.get("workers", 4)))) as pool:
            done = list(pool.map(one, range(start, start + count)))
    finally:
        ch.close()
    return {"count": count, "seconds": time.perf_counter() - t0,
            "unpublish_s": [u for u, _ in done if u], "delete_s": [d for _, d in done if d]}


# --- a reboot's worth of configfs: gone --------------------------------------------------------


def _unlink(path: Path) -> None:
    if path.is_symlink():
        path.unlink()


def clear_exports(prefix: str, root: Path = NVMET) -> dict[str, int]:
    """Remove every subsystem whose NQN starts with `prefix` in the safe order (lab.md: port
    links, namespace disable, namespaces, allowed hosts, the group), then host groups and ports
    nothing links to any more. Only with the agent stopped: this is what a reboot leaves."""
    subs_dir, ports_dir, hosts_dir = root / "subsystems", root / "ports", root / "hosts"
    ports = sorted(ports_dir.iterdir()) if ports_dir.is_dir() else []
    removed = 0
    for nqn in sorted(os.listdir(subs_dir)) if subs_dir.is_dir() else []:
        if not nqn.startswith(prefix):
            continue
        for port in ports:
            _unlink(port / "subsystems" / nqn)
        sub = subs_dir / nqn
        for ns in sorted((sub / "namespaces").iterdir()):
            if (ns / "enable").read_text().strip() == "1":
                (ns / "enable").write_text("0")
            ns.rmdir()
        for host in sorted((sub / "allowed_hosts").iterdir()):
            _unlink(host)
        sub.rmdir()
        removed += 1
    linked = {h for s in (subs_dir.iterdir() if subs_dir.is_dir() else []) for h in os.listdir(s / "allowed_hosts")}
    hosts = 0
    for host in sorted(hosts_dir.iterdir()) if hosts_dir.is_dir() else []:
        if host.name not in linked:
            host.rmdir()
            hosts += 1
    gone_ports = 0
    for port in ports:
        referrals = port / "referrals"
        if not any((port / "subsystems").iterdir()) and not (referrals.is_dir() and any(referrals.iterdir())):
            port.rmdir()
            gone_ports += 1
    return {"subsystems": removed, "hosts": hosts, "ports": gone_ports}


def _set_volmode(datasets: Sequence[str], mode: str) -> None:
    for i in range(0, len(datasets), SET_BATCH):
        _run(["zfs", "set", f"volmode={mode}", *datasets[i:i + SET_BATCH]], timeout=600 + 10 * SET_BATCH)


def _stop(stop_argv: Sequence[str]) -> None:
    stop = [str(x) for x in stop_argv]
    if stop[:2] != ["systemctl", "stop"] or len(stop) != 3:
        raise ValueError("expected a `systemctl stop UNIT` command line")
    _run(stop, check=False, timeout=120)
    deadline = time.monotonic() + 60
    while _run(["systemctl", "is-active", stop[-1]], check=False).stdout.strip() in ("active", "deactivating"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stop[-1]} did not stop")
        time.sleep(0.1)


def exports(a: dict[str, Any]) -> dict[str, Any]:
    """How many of this node's subsystems configfs holds (the bench agent serves them all)."""
    subs = NVMET / "subsystems"
    prefix = node_prefix(a["node"])
    return {"subsystems": sum(1 for n in (os.listdir(subs) if subs.is_dir() else []) if n.startswith(prefix)),
            "linked": linked_subsystems(prefix)}


def clear(a: dict[str, Any]) -> dict[str, Any]:
    """Stop the agent and empty this node's configfs (cleanup after a failed run)."""
    _stop(a["stop_argv"])
    return clear_exports(node_prefix(a["node"]))


def restart(a: dict[str, Any]) -> dict[str, Any]:
    """Stop the agent; with `clear`, empty this node's configfs as a reboot does; with
    `devices_off`, set volmode=none on the bench volumes [0, count) too (their device nodes are
    gone, as when udev has not created them yet); then time start -> GetInfo ready."""
    _stop(a["stop_argv"])
    prep: dict[str, Any] = {}
    t0 = time.perf_counter()
    if a.get("clear"):
        prep["cleared"] = clear_exports(node_prefix(a["node"]))
    if a.get("devices_off"):
        parent = check_dataset(a["parent"])
        prefix = _check_prefix(a["prefix"])
        datasets = [check_dataset(f"{parent}/v/{volume_id(prefix, i)}") for i in range(int(a["count"]))]
        _set_volmode(datasets, "none")
        _settle()
        prep["devices_off"] = len(datasets)
    prep["prep_seconds"] = time.perf_counter() - t0
    out = agent_restart(a)
    return {**out, **prep, "linked": linked_subsystems(node_prefix(a["node"]))}


def linked_subsystems(prefix: str, root: Path = NVMET) -> int:
    """Subsystems of this node linked to a port: exports a host can reach right now."""
    ports = root / "ports"
    return len({n for p in (ports.iterdir() if ports.is_dir() else []) for n in os.listdir(p / "subsystems")
                if n.startswith(prefix)})


def bare_volmode(a: dict[str, Any]) -> dict[str, Any]:
    """Baseline for the batched activation: `zfs set volmode=dev` one process per zvol vs one
    process for as many, on fresh inactive zvols of the bench (never exported), then destroyed."""
    parent = check_dataset(a["parent"])
    n = int(a.get("count", 10))
    _run(["zfs", "create", "-p", "-o", "volmode=none", parent])
    names = [check_dataset(f"{parent}/b{i:04d}") for i in range(2 * n)]
    try:
        for name in names:
            _run(["zfs", "create", "-s", "-V", str(16 * MiB), "-o", "volmode=none", name])
        _settle()
        t0 = time.perf_counter()
        for name in names[:n]:
            _run(["zfs", "set", "volmode=dev", name])
        separate = time.perf_counter() - t0
        t0 = time.perf_counter()
        _run(["zfs", "set", "volmode=dev", *names[n:]], timeout=600 + 10 * n)
        batched = time.perf_counter() - t0
        _settle()
        _set_volmode(names, "none")
        _settle()
    finally:
        _run(["zfs", "destroy", "-r", parent], check=False, timeout=1200)
    return {"count": n, "separate_seconds": separate, "batched_seconds": batched}


COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "populate": populate,
    "ops": ops,
    "teardown": teardown,
    "restart": restart,
    "clear": clear,
    "exports": exports,
    "bare-volmode": bare_volmode,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in COMMANDS:
        print(f"usage: python -m bench.inguest_restore {{{','.join(COMMANDS)}}} '<json>'", file=sys.stderr)
        return 2
    print(json.dumps(COMMANDS[args[0]](json.loads(args[1]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
