"""The kill -9 failpoint wrapper used by the lab crash tests."""

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


@pytest.mark.parametrize("bad", ["nope:after", "create_volume", "create_volume:during"])
def test_bad_failpoints_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        failpoints.FailpointZfs(FakeZfs(), bad)
