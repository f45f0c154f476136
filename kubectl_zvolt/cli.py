"""`kubectl zvolt ...` (kubectl runs the `kubectl-zvolt` executable it finds on PATH)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from kubectl_zvolt import drain, tree
from kubectl_zvolt.attachments import attachments
from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.format import age, dump, table
from kubectl_zvolt.kube import Exec, ExecInput, Kube, Session, Target, stream_exec, stream_session
from kubectl_zvolt.model import DRIVER
from kubectl_zvolt.move import move
from kubectl_zvolt.ops import Ops, Result
from kubectl_zvolt.rotate import rotate_key
from kubectl_zvolt.usage import size, usage

Connect = Callable[[Target], Kube]


def _add_globals(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """kubectl's global flags go before or after the subcommand. The subcommand's copies default
    to SUPPRESS, so they only override the top level's when given."""
    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--kubeconfig", default=d(None),
                   help="path to the kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", default=d(None), help="kubeconfig context to use")
    p.add_argument("-n", "--namespace", default=d(None), help="namespace (default: the context's, else 'default')")
    p.add_argument("--driver", default=d(DRIVER), help=argparse.SUPPRESS)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_globals(common, defaults=False)

    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_true", help="wait until the new object is usable")
    waiting.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")

    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")

    p = argparse.ArgumentParser(
        prog="kubectl zvolt",
        description="Branch, snapshot and restore zvolt volumes (PVCs of a csi.zvolt.io StorageClass).",
    )
    _add_globals(p, defaults=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("branch", parents=[common, waiting],
                       help="new PVC cloned from a PVC (now) or from one of its VolumeSnapshots")
    b.add_argument("src", metavar="SRC", help="source PVC")
    b.add_argument("new", metavar="NEW", help="name of the new PVC")
    b.add_argument("--from-snapshot", metavar="SNAPSHOT", help="branch from this VolumeSnapshot of SRC")
    b.add_argument("--checkpoint", action="store_true",
                   help="run CHECKPOINT in the Postgres pod mounting SRC first (short crash recovery)")
    b.add_argument("--checkpoint-user", default="postgres", help="database role for CHECKPOINT (default postgres)")

    s = sub.add_parser("snapshot", parents=[common, waiting], help="VolumeSnapshot of a PVC")
    s.add_argument("pvc", metavar="PVC")
    s.add_argument("name", metavar="NAME")

    r = sub.add_parser("restore", parents=[common, waiting], help="new PVC from a VolumeSnapshot")
    r.add_argument("snapshot", metavar="SNAPSHOT")
    r.add_argument("new", metavar="NEW")
    r.add_argument("--storage-class", help="class of the new PVC (default: the source PVC's)")

    d = sub.add_parser("delete", parents=[common], help="delete a zvolt PVC or VolumeSnapshot")
    d.add_argument("ref", metavar="PVC|SNAPSHOT", help="NAME, or pvc/NAME, snapshot/NAME when ambiguous")

    t = sub.add_parser("tree", parents=[common, listing], help="branch graph with sizes and ages")
    t.add_argument("pvc", metavar="PVC", nargs="?", help="only the tree under this PVC")

    sub.add_parser("ls", parents=[common, listing], help="zvolt PVCs and VolumeSnapshots")

    a = sub.add_parser("attachments", parents=[common, listing],
                       help="what storage nodes publish to which worker, and whether Kubernetes still attaches it "
                       "(-n: zvolt's namespace)")
    a.add_argument("--clear", action="store_true",
                   help="unpublish the stale ones (no VolumeAttachment wants them; checked again under the "
                   "volume's lock)")
    u = sub.add_parser("usage", parents=[common],
                       help="space per PVC and per namespace as the storage nodes count it (-n: zvolt's namespace)")
    u.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    u.add_argument("--pvc-namespace", metavar="NS", help="only the PVCs of this namespace (default: all)")
    k = sub.add_parser("rotate-key", parents=[common],
                       help="new key for an encrypted StorageClass: zfs change-key of every volume of the class "
                       "(no data copied), then the class's Secret (-n: zvolt's namespace)")
    k.add_argument("storage_class", metavar="STORAGECLASS")
    k.add_argument("--new-key-file", required=True, metavar="FILE",
                   help="the new key, 64 hex characters (openssl rand -hex 32 > FILE); never give it in argv")
    m = sub.add_parser("move", parents=[common],
                       help="move a PVC's volume with its snapshots to another storage node; a volume in use "
                       "moves live, its nodes adding a path to the new one before the cutover (-n: zvolt's namespace)")
    m.add_argument("pvc", metavar="PVC")
    m.add_argument("--to", required=True, metavar="STORAGE-NODE", help="the storage node to move it to")
    m.add_argument("--pvc-namespace", default="default", metavar="NS", help="the PVC's namespace (default: default)")
    m.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the move (default 3600)")
    moving = argparse.ArgumentParser(add_help=False)
    moving.add_argument("--parallel", type=int, default=2, help="moves at once (default 2)")
    moving.add_argument("--dry-run", action="store_true", help="print the plan; move nothing")
    moving.add_argument("--rate-limit", type=float, default=0.0, metavar="MIB_PER_S",
                        help="MiB/s each move's stream may take (default 0: no limit)")
    moving.add_argument("--timeout", type=float, default=86400.0, help="seconds to wait (default 86400)")
    ds = sub.add_parser("drain-storage", parents=[common, moving],
                        help="cordon a storage node (no new volumes) and move every volume off it, idle ones first; "
                        "prints the plan first, rerun to carry on (-n: zvolt's namespace)")
    ds.add_argument("node", metavar="STORAGE-NODE")
    us = sub.add_parser("uncordon-storage", parents=[common],
                        help="a cordoned (drained) storage node takes new volumes again (-n: zvolt's namespace)")
    us.add_argument("node", metavar="STORAGE-NODE")
    sub.add_parser("rebalance", parents=[common, moving],
                   help="even committed space across storage nodes by moving idle volumes (-n: zvolt's namespace)")
    return p


def _print_result(res: Result, out: TextIO) -> None:
    kind = "persistentvolumeclaim" if res.kind == "PersistentVolumeClaim" else "volumesnapshot"
    extra = f" ({res.detail})" if res.detail else ""
    out.write(f"{kind}/{res.name} {res.phase.lower()} in {res.elapsed:.2f}s{extra}\n")


def run(argv: Sequence[str], *, connect: Connect = Kube.connect, execute: Exec | None = None,
        execute_input: ExecInput | None = None, session: Session | None = None, out: TextIO = sys.stdout) -> int:
    args = parser().parse_args(list(argv))
    kube = connect(Target(args.kubeconfig, args.context, args.namespace))
    ops = Ops(kube, driver=args.driver, execute=execute or stream_exec(kube))
    if args.command == "branch":
        _print_result(ops.branch(args.src, args.new, from_snapshot=args.from_snapshot, checkpoint=args.checkpoint,
                                 checkpoint_user=args.checkpoint_user, wait=args.wait, timeout=args.timeout), out)
    elif args.command == "snapshot":
        _print_result(ops.snapshot(args.pvc, args.name, wait=args.wait, timeout=args.timeout), out)
    elif args.command == "restore":
        _print_result(ops.restore(args.snapshot, args.new, storage_class=args.storage_class,
                                  wait=args.wait, timeout=args.timeout), out)
    elif args.command == "delete":
        _print_result(ops.delete(args.ref), out)
    elif args.command == "ls":
        vols, snaps = ops.inventory()
        if args.output != "table":
            out.write(dump({"namespace": kube.namespace, "volumes": [v.as_dict() for v in vols],
                            "snapshots": [s.as_dict() for s in snaps]}, args.output) + "\n")
        else:
            rows = [[v.name, v.phase, v.size or "?", v.storage_class or "",
                     f"{'pvc' if v.source.kind == 'PersistentVolumeClaim' else 'snapshot'}/{v.source.name}"
                     if v.source else "", age(v.created)] for v in vols]
            out.write(table(["PVC", "STATUS", "SIZE", "CLASS", "SOURCE", "AGE"], rows) + "\n")
            if snaps:
                srows = [[s.name, "true" if s.ready else "false", s.restore_size or "?", s.source_pvc or "",
                          age(s.created)] for s in snaps]
                out.write("\n" + table(["SNAPSHOT", "READY", "SIZE", "SOURCE", "AGE"], srows) + "\n")
    elif args.command == "attachments":
        found, unreachable = attachments(kube, execute or stream_exec(kube), args.clear)
        if args.output != "table":
            out.write(dump({"attachments": [vars(a) for a in found], "unreachable": unreachable}, args.output) + "\n")
        else:
            out.write(table(["VOLUME", "NODE", "STATE", "HOST NQN"],
                            [[a.volume_id, a.node or "?", a.state, a.host_nqn] for a in found]) + "\n")
            for name, why in unreachable.items():
                out.write(f"storage node {name} did not answer: {why}\n")
        return 1 if unreachable else 0
    elif args.command == "usage":
        report = usage(kube, execute or stream_exec(kube), args.pvc_namespace)
        if args.output != "table":
            out.write(dump(report.as_dict(), args.output) + "\n")
        else:
            out.write(table(["NAMESPACE", "PVC", "PV", "NODE", "SIZE", "USED", "UNIQUE", "RATIO"],
                            [[p.namespace or "-", p.pvc or "-", p.pv, p.node, size(p.logical_bytes),
                              size(p.referenced_bytes), size(p.unique_bytes), f"{p.compress_ratio:.2f}x"]
                             for p in report.pvcs]) + "\n\n")
            out.write(table(["NAMESPACE", "PVCS", "SIZE", "USED", "UNIQUE"],
                            [[n.namespace or "-", str(n.pvcs), size(n.logical_bytes), size(n.referenced_bytes),
                              size(n.unique_bytes)] for n in report.namespaces]) + "\n")
            for name, why in report.unreachable.items():
                out.write(f"storage node {name} did not answer: {why}\n")
        return 1 if report.unreachable else 0
    elif args.command == "rotate-key":
        try:
            new_key = Path(args.new_key_file).read_text()
        except OSError as e:
            raise PluginError(f"cannot read --new-key-file {args.new_key_file}: {e.strerror}") from None
        res = rotate_key(kube, execute_input or stream_exec(kube), args.driver, args.storage_class, new_key)
        for volume in res.rotated:
            out.write(f"rotated {volume}\n")
        for volume, why in res.failed.items():
            out.write(f"failed  {volume}: {why}\n")
        if res.failed:
            out.write(f"{len(res.failed)} of {len(res.rotated) + len(res.failed)} volumes failed; Secret {res.secret} "
                      "keeps the old key and records the new one: fix the cause and run the same command again\n")
            return 1
        out.write(f"StorageClass {res.storage_class}: {len(res.rotated)} volumes on the new key; "
                  f"Secret {res.secret} updated\n")
    elif args.command == "move":
        def say(line: str) -> None:
            out.write(line + "\n")
            out.flush()

        moved = move(kube, session or stream_session(kube, timeout=args.timeout), execute_input or stream_exec(kube),
                     args.driver, args.pvc_namespace, args.pvc, args.to, say)
        out.write(moved.output if moved.output.endswith("\n") or not moved.output else moved.output + "\n")
        if moved.code != 0:
            out.write(f"PVC {moved.pvc} (volume {moved.volume_id}) was not moved; after fixing the cause, the same "
                      "command carries on where it stopped\n")
            return 1
    elif args.command in ("drain-storage", "uncordon-storage", "rebalance"):
        return _drain(args, kube, execute, out)
    elif args.command == "tree":
        vols, snaps = ops.inventory()
        roots = tree.build(vols, snaps, args.pvc)
        if args.output != "table":
            out.write(dump({"namespace": kube.namespace, "trees": [r.as_dict() for r in roots]}, args.output) + "\n")
        elif roots:
            out.write(tree.render(roots) + "\n")
        else:
            out.write(f"no zvolt volumes in namespace {kube.namespace}\n")
    return 0


def _drain(args: argparse.Namespace, kube: Kube, execute: Exec | None, out: TextIO) -> int:
    """The controller's lines are shown as they come (a drain runs for long), else at the end."""
    def echo(text: str) -> None:
        out.write(text)
        out.flush()

    run = execute or stream_exec(kube, timeout=getattr(args, "timeout", 120.0), echo=echo)
    if args.command == "drain-storage":
        done = drain.drain_storage(kube, run, args.node, args.parallel, args.dry_run, args.rate_limit)
    elif args.command == "uncordon-storage":
        done = drain.uncordon_storage(kube, run, args.node)
    else:
        done = drain.rebalance(kube, run, args.parallel, args.dry_run, args.rate_limit)
    if execute is not None:
        out.write(done.output if done.output.endswith("\n") or not done.output else done.output + "\n")
    if done.code != 0 and args.command != "uncordon-storage" and not args.dry_run:
        out.write("not everything moved; after fixing the cause, the same command carries on where it stopped\n")
    return 0 if done.code == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except PluginError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
