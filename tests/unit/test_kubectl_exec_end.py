"""How an exec stream's end becomes an exit status (kubectl_zvolt/kube.py finished), and what
goes in on stdin. A real kubelet lab run found both: the client raised TypeError when the command
outlived the read loop, and the command outlived it because its one request line had no newline
(it reads a line, and an exec stream never sends EOF)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from kubectl_zvolt.kube import TIMED_OUT, finished, stream_exec


class Stream:
    def __init__(self, open_: bool, status: Any) -> None:
        self.open, self.status, self.closed = open_, status, False

    def is_open(self) -> bool:
        return self.open and not self.closed

    def close(self) -> None:
        self.closed = True

    @property
    def returncode(self) -> int | None:
        if isinstance(self.status, Exception):
            raise self.status
        return self.status  # type: ignore[no-any-return]


def test_a_command_still_running_at_the_deadline_is_closed_and_timed_out() -> None:
    s = Stream(True, TypeError("'NoneType' object is not subscriptable"))
    code, out = finished(s, 120, "partial")
    assert code == TIMED_OUT and s.closed and "did not finish within 120s" in out and out.startswith("partial")


def test_an_ended_stream_gives_its_status_and_one_without_a_status_fails() -> None:
    assert finished(Stream(False, 0), 120, "ok") == (0, "ok")
    assert finished(Stream(False, 3), 120, "no") == (3, "no")
    code, out = finished(Stream(False, TypeError("'NoneType' object is not subscriptable")), 120, "")
    assert code == 1 and "without an exit status" in out


class LineCommand:
    """An exec'd command that reads one line from stdin, as `zvolt-csi --mode live-path` does, on
    a stream that never ends stdin: it answers once a newline came, and otherwise runs on."""

    def __init__(self) -> None:
        self.stdin, self.out = "", ""

    def write_stdin(self, data: str) -> None:
        self.stdin += data
        if "\n" in self.stdin:
            self.out = "answered " + self.stdin.split("\n", 1)[0]

    def is_open(self) -> bool:
        return not self.out

    def update(self, timeout: float = 0) -> None:
        pass

    def peek_stdout(self) -> bool:
        return False

    def peek_stderr(self) -> bool:
        return False

    @property
    def returncode(self) -> int:
        return 0

    def close(self) -> None:
        self.out = self.out or "closed"


def test_a_request_on_stdin_goes_as_one_ended_line(monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = LineCommand()
    fake = types.ModuleType("kubernetes.stream")
    fake.stream = lambda *a, **kw: cmd  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kubernetes.stream", fake)
    kube = types.SimpleNamespace(core=types.SimpleNamespace(connect_get_namespaced_pod_exec=None))
    run = stream_exec(kube, timeout=0.2)  # type: ignore[arg-type]
    assert run("ns", "pod", "c", ["cmd"], stdin='{"op": "add"}') == (0, "")
    assert cmd.stdin == '{"op": "add"}\n' and cmd.out == 'answered {"op": "add"}'
