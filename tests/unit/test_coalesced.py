"""agent/coalesced.py: callers that arrive during a read share the next one."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.coalesced import CoalescedReads
from agent.zfs import ZfsError


class SlowRead:
    """Blocks its first call until released, recording every batch it was asked for."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail: set[str] = set()

    def __call__(self, names: Sequence[str]) -> dict[str, dict[str, str]]:
        self.batches.append(list(names))
        self.started.set()
        assert self.release.wait(10)
        if self.fail & set(names):
            raise ZfsError(5, "zfs get: I/O error")
        return {n: {"referenced": str(len(n))} for n in names if not n.endswith("gone")}


def _wait_queued(reads: CoalescedReads, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(reads._open.names if reads._open else []) < n:  # callers are not observable otherwise
        assert time.monotonic() < deadline, "callers did not queue"
        time.sleep(0.01)


def test_a_lone_caller_reads_at_once() -> None:
    read = SlowRead()
    read.release.set()
    reads = CoalescedReads(read)
    assert reads.get("p/v1@s") == {"referenced": "6"}
    assert reads.get("p/gone") is None
    assert read.batches == [["p/v1@s"], ["p/gone"]]


def test_callers_during_a_read_share_the_next_one() -> None:
    read = SlowRead()
    reads = CoalescedReads(read)
    names = [f"p/v{i}@s" for i in range(12)]
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        first = pool.submit(reads.get, names[0])
        assert read.started.wait(10)
        rest = [pool.submit(reads.get, n) for n in names[1:]]
        _wait_queued(reads, len(rest))  # every other caller waits behind the running read
        read.release.set()
        got = [first.result(10), *(f.result(10) for f in rest)]
    assert got == [{"referenced": str(len(n))} for n in names]
    assert read.batches == [names[:1], names[1:]], read.batches


def test_a_failed_read_fails_every_caller_of_its_batch_and_no_other() -> None:
    read = SlowRead()
    read.fail = {"p/bad@s"}
    reads = CoalescedReads(read)
    with ThreadPoolExecutor(max_workers=3) as pool:
        first = pool.submit(reads.get, "p/ok@s")
        assert read.started.wait(10)
        bad = pool.submit(reads.get, "p/bad@s")
        other = pool.submit(reads.get, "p/other@s")
        _wait_queued(reads, 2)
        read.release.set()
        assert first.result(10) == {"referenced": "6"}
        for fut in (bad, other):
            with pytest.raises(ZfsError):
                fut.result(10)
    # The next caller starts afresh.
    assert reads.get("p/after@s") == {"referenced": "9"}
