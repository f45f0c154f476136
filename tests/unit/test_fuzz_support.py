"""Shared pieces of the gRPC fuzz tests (no tests here): hostile inputs and the verdict on a status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from hypothesis import strategies as st

# Values that have broken storage drivers before: traversal, NUL, option injection, separators,
# dataset/snapshot syntax, configfs-looking names, right-to-left marks, sheer length.
HOSTILE = [
    "", " ", "\n", "\x00", "a\x00b", "..", "../", "../../etc/passwd", "/etc/shadow", "./x", "x/../../y",
    "-o", "--help", "-rf", "-o remount,rw", "--hostnqn=evil", "a,b", "ro,dev,suid", "nodev,exec",
    "tank", "tank/zvolt", "tank/zvolt/v/x", "tank/zvolt/../other", "v@s", "v@", "@s", "v#bm", "v%s",
    "vabc@sdef@x", "storage-0/", "/vabc", "storage-0/vabc", "storage-0/vabc@sx", "storage-0//vabc",
    "nqn.2014-08.org.nvmexpress:uuid:../../x", "nqn.2014-08.org.nvmexpress.discovery",
    "nqn.2026-11.io.zvolt:storage-0:v/../x", "allowed_hosts", "attr_allow_any_host", "1", "*", "?",
    "$(reboot)", "`id`", "; rm -rf /", "|cat", "%n%n%n", "{}", "\\", "é", "\u202e", "\ud7ff", "🦀",
    "\u210c\U0001d522\U0001d529\U0001d529\U0001d52c", "A" * 255, "a" * 256, "x" * 4096, "DHHC-1:01:AAAA:",
]

hostile_text = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="ascii"), max_size=80),
    st.builds(lambda a, b: a + b, st.sampled_from(HOSTILE), st.text(max_size=20)),
)

sizes = st.one_of(
    st.sampled_from([0, -1, 1, 511, 4096, 1 << 20, 1 << 30, (1 << 40) + 1, (1 << 62), (1 << 63) - 1, -(1 << 63)]),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
)

# Never acceptable on a hostile input: a crash (INTERNAL/UNKNOWN), a hang or "retry later" lie.
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.DATA_LOSS}
TRACEBACK_MARKS = ("Traceback", 'File "/', "Error:\n", "most recent call last", ".py\", line")


class Tally:
    """Counts what the fuzzers sent and which codes came back (printed for the closing note)."""

    def __init__(self, tolerate: Callable[[grpc.StatusCode, str], bool] | None = None) -> None:
        self.cases = 0
        self.codes: dict[str, int] = {}
        self.tolerate = tolerate  # a documented exception to FORBIDDEN (code, details) -> ok

    def call(self, method: Callable[..., Any], request: Any, allowed: set[grpc.StatusCode] | None = None) -> Any:
        self.cases += 1
        try:
            result = method(request, timeout=90)  # generous: CI machines are shared and slow
            self.codes["OK"] = self.codes.get("OK", 0) + 1
            return result
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
            self.codes[code.name] = self.codes.get(code.name, 0) + 1
            excused = self.tolerate is not None and self.tolerate(code, details)
            assert excused or code not in FORBIDDEN, f"{code.name} for {type(request).__name__}: {details[:300]!r}"
            if allowed is not None:
                assert code in allowed, f"{code.name} not in {sorted(c.name for c in allowed)}: {details[:300]!r}"
            assert not any(m in details for m in TRACEBACK_MARKS), f"traceback text reached the client: {details!r}"
            assert details, f"{code.name} without a message the user can act on"
            return None
