"""Who may call what on an agent.

The caller is who its client certificate says (mTLS, verified against the CA). Only the
controller changes anything: its certificate's Common Name is the one the agent is told
(`--controller-cn`, the chart passes its controller certificate's name). Any other
certificate from the same CA -- another storage node's, a node plugin's -- may only read
GetInfo. Without TLS (unix socket in the lab, `--insecure`) there is no caller identity and
every call is allowed: that mode is refused unless asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc

from zvolt.errors import ZvoltError
from zvolt.rpc import Unary, wrap_unary

ANYONE = frozenset({"GetInfo"})


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The verified client certificate's CN; None when the call did not come over TLS."""
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    names = auth.get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else ""


class Authorizer(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, controllers: Iterable[str]) -> None:
        self.controllers = frozenset(controllers)

    def allowed(self, method: str, caller: str | None) -> bool:
        return caller is None or caller in self.controllers or method in ANYONE

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        return wrap_unary(continuation, handler_call_details, self._checked)

    def _checked(self, method: str, inner: Unary) -> Unary:
        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            caller = peer_common_name(context)
            if not self.allowed(method, caller):
                raise ZvoltError(grpc.StatusCode.PERMISSION_DENIED,
                                 f"certificate {caller!r} may not call {method}: only the controller changes volumes")
            return inner(request, context)

        return checked
