"""Orderly shutdown on SIGTERM, within the grace period the chart gives the pod.

New calls are refused at once (UNAVAILABLE: the controller and sidecars retry them on the
restarted agent). Calls already running get the grace to finish. One that cannot (a ZFS call
stuck on a busy pool, a device node that does not appear) is left to its intent: the next
start-up settles the index against ZFS, so the caller's retry converges either way.
"""

from __future__ import annotations

import time

import grpc

from zvolt.rpc import InFlight

CANCEL_WAIT = 2.0  # seconds


def drain(server: grpc.Server, inflight: InFlight, grace: float) -> list[str]:
    """Stop serving and wait up to `grace` seconds for running calls.

    Returns the methods still running after the grace (empty when every call finished)."""
    deadline = time.monotonic() + grace
    # grpc refuses new calls now and cancels running ones at the deadline; their handler
    # threads keep going, which is why the wait below counts handlers, not RPCs.
    stopped = server.stop(grace)
    inflight.wait_idle(deadline - time.monotonic())
    left = inflight.running()
    if left:
        # Let the cancellation reach the callers (UNAVAILABLE, retried) before the process goes.
        stopped.wait(CANCEL_WAIT)
    return left
