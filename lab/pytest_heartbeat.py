"""A pytest plugin (`-p lab.pytest_heartbeat`) that keeps long test runs from going silent.

With `-q` pytest prints one dot per finished test, so a lab test that runs for ten minutes is ten
minutes without a line. While a test runs longer than the interval, a thread writes a line every
interval naming it and its time so far. The line must reach the terminal although pytest captures
file descriptors 1 and 2 during tests: the plugin keeps a copy of the terminal's descriptor, taken
before capturing starts (which is why it is loaded with -p, not from a conftest).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import pytest

INTERVAL_ENV = "ZVOLT_TEST_HEARTBEAT"  # seconds; default 30, 0 turns the lines off
DEFAULT_INTERVAL = 30.0


@dataclass
class Heartbeat:
    fd: int
    interval: float
    running: tuple[str, float] | None = None  # (nodeid, start)
    stop: threading.Event = field(default_factory=threading.Event)
    mu: threading.Lock = field(default_factory=threading.Lock)

    def line(self, now: float) -> str | None:
        with self.mu:
            running = self.running
        if running is None or now - running[1] < self.interval:
            return None
        return f"\n[tests {time.strftime('%H:%M:%S')}] still running {running[0]} ({now - running[1]:.0f}s)\n"

    def loop(self) -> None:
        while not self.stop.wait(self.interval):
            text = self.line(time.monotonic())
            if text is not None:
                try:
                    os.write(self.fd, text.encode())
                except OSError:  # the terminal went away, or the session is closing
                    return


_KEY = pytest.StashKey[Heartbeat]()


def interval_from_env() -> float:
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_INTERVAL
    except ValueError:
        raise pytest.UsageError(f"{INTERVAL_ENV}={raw!r} is not a number of seconds") from None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> Generator[None, None, None]:
    # Runs before the capture plugin's own wrapper redirects fd 1.
    interval = interval_from_env()
    if interval > 0:
        beat = Heartbeat(os.dup(1), interval)
        early_config.stash[_KEY] = beat
        threading.Thread(target=beat.loop, name="test-heartbeat", daemon=True).start()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, object]:
    beat = item.config.stash.get(_KEY, None)
    if beat is not None:
        with beat.mu:
            beat.running = (item.nodeid, time.monotonic())
    try:
        return (yield)
    finally:
        if beat is not None:
            with beat.mu:
                beat.running = None


def pytest_unconfigure(config: pytest.Config) -> None:
    beat = config.stash.get(_KEY, None)
    if beat is not None:
        beat.stop.set()
        os.close(beat.fd)
