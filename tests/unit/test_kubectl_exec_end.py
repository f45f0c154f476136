"""How an exec stream's end becomes an exit status (kubectl_zvolt/kube.py finished): a real
kubelet lab run found the client raising TypeError when the command outlived the read loop."""

from __future__ import annotations

from typing import Any

from kubectl_zvolt.kube import TIMED_OUT, finished


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
