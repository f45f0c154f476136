"""Runs the chosen suites in order against one lab guest and collects one Report."""

from __future__ import annotations

import secrets
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc

from bench.config import BenchConfig
from bench.csiclient import Csi
from bench.guest import Guest, LabLike
from bench.progress import Progress
from bench.results import Report, SuiteResult
from bench.suites import attach, branch, burst, datapath, restore, scale
from bench.suites.context import Context
from zvolt.pb import csi_pb2, csi_pb2_grpc

PROBE_TIMEOUT_S = 15.0
RESTART_PROBE_TIMEOUT_S = 120.0

SUITE_RUNNERS: dict[str, Callable[[Context], SuiteResult]] = {
    "branch": branch.run,
    "scale": scale.run,
    "datapath": datapath.run,
    "attach": attach.run,
    "restore": restore.run,
    "burst": burst.run,
}


def _reachable(target: str, timeout: float, wait_for_ready: bool) -> bool:
    """Probe on a fresh channel; with `wait_for_ready`, wait for the server up to `timeout`.

    A channel that was refused once sits in reconnect backoff and fails the next call at once,
    even when the server has come up meanwhile, so every probe gets its own channel.
    """
    with grpc.insecure_channel(target) as ch:
        try:
            csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=timeout,
                                                wait_for_ready=wait_for_ready)
        except grpc.RpcError:
            return False
    return True


def connect_csi(lab: LabLike, progress: Progress) -> Csi | None:
    """A CSI client when the lab's controller (and node plugin) answer; None when the driver is absent.

    The lab starts the services when their modules exist; an unanswered Probe gets one (re)start.
    """
    try:
        controller, node = lab.grpc_target("controller"), lab.grpc_target("node")
    except KeyError:
        return None
    if not _reachable(controller, PROBE_TIMEOUT_S, wait_for_ready=False):
        progress.say("CSI controller not answering: (re)starting agent, controller and node plugin")
        for start in (lab.start_agent, lab.start_controller, lab.start_node):
            try:
                start()
            except Exception as e:  # the driver may not exist yet in this tree: measure what we can
                progress.say(f"could not start a service: {e}; CSI-side figures will be missing")
                return None
        if not _reachable(controller, RESTART_PROBE_TIMEOUT_S, wait_for_ready=True):
            progress.say(f"CSI controller still not answering {RESTART_PROBE_TIMEOUT_S:.0f} s after its restart; "
                         "CSI-side figures will be missing")
            return None
    return Csi(controller=controller, node=node, timeout=600)


def run_suites(cfg: BenchConfig, lab: LabLike | None, progress: Progress, json_path: Path | None = None) -> Report:
    """Run the suites; with `json_path`, the JSON is rewritten after each suite (long runs keep partial results)."""
    report = Report(quick=cfg.quick)
    run_id = secrets.token_hex(3)
    sim_result: SuiteResult | None = None
    if cfg.simulate:
        import bench.simulate as simulate

        sim_result = SuiteResult("scale")
        t0 = time.perf_counter()
        sim_result.data["simulate"] = simulate.run(cfg.simulate, progress, cfg.quick)
        sim_result.rows.extend(simulate.rows(sim_result.data["simulate"]))
        sim_result.seconds = time.perf_counter() - t0
    if cfg.simulate_only or cfg.fake_only or lab is None:
        if sim_result is not None:
            report.suites.append(sim_result)
        if "restore" in cfg.suites:  # its fake half needs no guest
            progress.say("suite restore (fakes only): start")
            report.suites.append(restore.run_fake_only(cfg, progress))
        return report
    guest = Guest(lab)
    csi = connect_csi(lab, progress)
    ctx = Context(cfg=cfg, guest=guest, progress=progress, run_id=run_id, csi=csi)
    if json_path is not None:
        ctx.checkpoint = partial(_write_with_partial, report, json_path)
    try:
        if ctx.agent is not None and csi is not None:
            # Switch to the bench agent before any CSI volume exists, so every volume the suites
            # create lives in the bench parent the agent serves for the whole run.
            ctx.agent.ensure()
        for name in cfg.suites:
            progress.say(f"suite {name}: start")
            t0 = time.perf_counter()
            try:
                result = SUITE_RUNNERS[name](ctx)
            except Exception as e:
                progress.say(f"suite {name} failed:\n{traceback.format_exc()}")
                _say_service_logs(lab, progress)
                detail = e.details() if isinstance(e, grpc.RpcError) and hasattr(e, "details") else str(e)
                result = SuiteResult(name, error=f"{type(e).__name__}: {' '.join(str(detail).split())[:400]}")
            result.seconds = time.perf_counter() - t0
            if name == "scale" and sim_result is not None:
                result.data["simulate"] = sim_result.data["simulate"]
                result.rows.extend(sim_result.rows)
            report.suites.append(result)
            progress.say(f"suite {name}: done in {result.seconds:.0f} s")
            if json_path is not None:
                report.write_json(json_path)
    finally:
        if csi is not None:
            csi.close()
        _cleanup(ctx)
    return report


def _write_with_partial(report: Report, path: Path, suite: SuiteResult) -> None:
    """The JSON as it stands, with one suite still running (marked `partial`)."""
    suite.notes = [*suite.notes, "partial: the suite was still running when this was written"]
    Report(quick=report.quick, suites=[*report.suites, suite], started_unix=report.started_unix).write_json(path)


def _say_service_logs(lab: LabLike | None, progress: Progress) -> None:
    """A failed suite's cause is often in a service's journal (a CI log is all there is to read)."""
    for service in ("agent", "controller"):
        try:
            log = lab.service_log(service, 200) if lab is not None else ""
        except Exception as e:
            log = f"(journal not readable: {e})"
        # Successful calls crowd out the few lines that say why (a CI log shows only a part).
        tail = "\n".join([ln for ln in log.splitlines() if '"status": "OK"' not in ln][-15:])
        if tail:
            progress.say(f"last lines of the {service}'s journal:\n{tail.rstrip()}")


def _cleanup(ctx: Context) -> None:
    """Destroy the bench's own datasets (filler too unless kept), so the guest is left as found."""
    if ctx.agent is not None:
        try:
            ctx.agent.restore(keep=ctx.cfg.keep_fill)
        except Exception as e:
            ctx.progress.say(f"putting the lab's agent back failed: {e}")
    parents = ["benchbranch", "benchdp"] + ([] if ctx.cfg.keep_fill else [ctx.cfg.fill_parent])
    # A zvol that is still an enabled nvmet namespace must never be destroyed (D-state hang, lab.md):
    # whatever a failed suite left connected or exported goes first.
    for command, netns in (("teardown-hosts", "worker"), ("teardown-exports", "storage")):
        try:
            ctx.guest.call(command, {"port_id": datapath.PORT}, netns=netns, timeout=300)
        except Exception as e:
            ctx.progress.say(f"cleanup {command} failed, not destroying exported datasets: {e}")
            parents = [p for p in parents if p != "benchdp"]
    for name in parents:
        try:
            ctx.guest.call("zfs-destroy", {"dataset": f"{ctx.pool}/{name}", "recursive": True}, timeout=3600)
        except Exception as e:
            ctx.progress.say(f"cleanup of {ctx.pool}/{name} failed: {e}")
