"""The kill -9 and stall failpoint wrapper used by the lab crash and shutdown tests."""

from __future__ import annotations

import os
import signal

import pytest

from agent import failpoints
from agent.fakes import FakeZfs


def test_failpoint_kills_at_the_named_point(monkeypatch: pytest.MonkeyPatch) -> None:
    kills: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append(sig))
    zfs = FakeZfs()
    zfs.create_filesystem("tank")
    after = failpoints.FailpointZfs(zfs, "create_volume:after")
    after.create_volume("tank/a", 1 << 20, {})
    assert kills == [signal.SIGKILL] and zfs.exists("tank/a")  # killed after the change was made
    before = failpoints.FailpointZfs(zfs, "create_volume:before")
    with pytest.raises(Exception):  # noqa: B017 - the fake refuses the duplicate once the "kill" returns
        before.create_volume("tank/a", 1 << 20, {})
    assert kills == [signal.SIGKILL, signal.SIGKILL]
    assert before.exists("tank/a")  # other calls pass through untouched


def test_stall_waits_once_on_the_named_side(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr("agent.failpoints.time.sleep", lambda s: events.append(f"sleep {s}"))
    monkeypatch.setattr(os, "kill", lambda pid, sig: events.append("kill"))
    zfs = FakeZfs()
    zfs.create_filesystem("tank")
    before = failpoints.FailpointZfs(zfs, "create_volume:stall-before=2.5")
    real = zfs.create_volume

    def create(*args: object, **kw: object) -> None:
        events.append("create")
        real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(zfs, "create_volume", create)
    before.create_volume("tank/a", 1 << 20, {})
    after = failpoints.FailpointZfs(zfs, "create_volume:stall-after=1")
    after.create_volume("tank/b", 1 << 20, {})
    assert events == ["sleep 2.5", "create", "create", "sleep 1.0"]  # never a kill, one stall each


@pytest.mark.parametrize("bad", ["nope:after", "create_volume", "create_volume:during", "create_volume:stall-before",
                                 "create_volume:stall-after=x", "create_volume:before=3"])
def test_bad_failpoints_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        failpoints.FailpointZfs(FakeZfs(), bad)
