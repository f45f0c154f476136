"""gRPC plumbing shared by the agent and the CSI services.

`RpcInterceptor` turns ZvoltError into the right status code, hides tracebacks from
clients, and writes one log line per call (method, ids, duration, status; never secrets).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from zvolt.errors import MOVED_TO_KEY, Moved, ZvoltError

# Request fields worth a place in the log line. Secrets and keys are never among them.
_ID_FIELDS = (
    "name",
    "volume_id",
    "snapshot_id",
    "source_volume_id",
    "source_snapshot_id",
    "node_id",
    "host_nqn",
    "staging_target_path",
    "target_path",
)
_log = logging.getLogger("zvolt.rpc")

# gRPC's reconnect backoff grows to 120 s by default. A channel that met a restarting agent (an
# upgrade, a slow recovery) would go on failing calls with the stale "connect failed" for that
# long after the agent is back; capped, it dials again within about two seconds. A dead node costs
# one refused connect per call at most that often.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class InFlight:
    """The calls a server is running now, so an orderly shutdown knows what it waits for.

    gRPC's `server.stop(grace)` cancels calls after the grace but cannot stop their handler
    threads: only the handlers themselves can say when they are done.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls: dict[int, str] = {}
        self._next = 0

    def enter(self, method: str) -> int:
        with self._cond:
            self._next += 1
            self._calls[self._next] = method
            return self._next

    def leave(self, token: int) -> None:
        with self._cond:
            self._calls.pop(token, None)
            if not self._calls:
                self._cond.notify_all()

    def running(self) -> list[str]:
        with self._cond:
            return sorted(self._calls.values())

    def wait_idle(self, timeout: float) -> bool:
        """True once no call runs; False if some still do after `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._calls, timeout=max(timeout, 0.0))


def request_ids(request: Any) -> dict[str, str]:
    ids: dict[str, str] = {}
    for field in _ID_FIELDS:
        try:
            value = getattr(request, field)
        except AttributeError:
            continue
        if isinstance(value, str) and value:
            ids[field] = value[:256]
    return ids


Unary = Callable[[Any, grpc.ServicerContext], Any]


def wrap_unary(continuation: Any, handler_call_details: Any, wrap: Callable[[str, Unary], Unary]) -> Any:
    """For a server interceptor: the call's unary handler with `wrap(method name, handler)` in
    its place; streaming handlers (zvolt has none) pass as they are."""
    handler = continuation(handler_call_details)
    if handler is None or handler.unary_unary is None:
        return handler
    method = handler_call_details.method.rsplit("/", 1)[-1]
    return grpc.unary_unary_rpc_method_handler(
        wrap(method, handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class RpcInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, component: str, on_done: Callable[[str, str, float], None] | None = None,
                 inflight: InFlight | None = None) -> None:
        self.component = component
        self.on_done = on_done
        self.inflight = inflight

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        return wrap_unary(continuation, handler_call_details, self._logged)

    def _logged(self, method: str, inner: Unary) -> Unary:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            code = grpc.StatusCode.OK
            message = ""
            token = self.inflight.enter(method) if self.inflight is not None else 0
            try:
                return inner(request, context)
            except ZvoltError as err:
                code, message = err.code, err.message
                if isinstance(err, Moved):
                    context.set_trailing_metadata(((MOVED_TO_KEY, err.to),))
                context.abort(err.code, err.message)
            except Exception as err:
                # grpc's own abort() raises; let it through with the code it set.
                if type(err).__name__ == "_AbortError" or isinstance(err, grpc.RpcError):
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                code, message = grpc.StatusCode.INTERNAL, "internal error (see server log)"
                _log.exception("unhandled error in %s", method, extra={"fields": {"method": method}})
                context.abort(code, message)
            finally:
                if self.inflight is not None:
                    self.inflight.leave(token)
                duration = time.monotonic() - start
                fields: dict[str, Any] = {
                    "component": self.component,
                    "method": method,
                    "status": code.name,
                    "duration_ms": round(duration * 1000, 2),
                    **request_ids(request),
                }
                if message:
                    fields["error"] = message
                _log.info("rpc", extra={"fields": fields})
                if self.on_done is not None:
                    self.on_done(method, code.name, duration)

        return wrapped


@dataclass(frozen=True)
class Endpoint:
    """A listen/dial address: unix:///path or tcp://host:port (host:port also accepted)."""

    scheme: str
    address: str

    @property
    def grpc_target(self) -> str:
        return f"unix://{self.address}" if self.scheme == "unix" else self.address

    @property
    def path(self) -> str:
        if self.scheme != "unix":
            raise ValueError("not a unix endpoint")
        return self.address


def parse_endpoint(value: str) -> Endpoint:
    if value.startswith("unix://"):
        path = value.removeprefix("unix://")
        if not path.startswith("/"):
            raise ValueError(f"unix endpoint needs an absolute path: {value!r}")
        return Endpoint("unix", path)
    if value.startswith("tcp://"):
        value = value.removeprefix("tcp://")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {value!r} is not unix:///path or host:port")
    return Endpoint("tcp", f"{host}:{port}")


def prepare_unix_socket(endpoint: Endpoint) -> None:
    """Remove a stale socket file and make sure its folder exists (root-only)."""
    if endpoint.scheme != "unix":
        return
    folder = os.path.dirname(endpoint.path)
    os.makedirs(folder, mode=0o750, exist_ok=True)
    if os.path.exists(endpoint.path):
        os.unlink(endpoint.path)
