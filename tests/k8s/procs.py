"""Local processes of a test session: argv lists (no shell), one log file each, and a stop
that always ends every process it started (SIGTERM, then SIGKILL), newest first."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")


class HarnessError(RuntimeError):
    """A step of the harness failed; the message carries the relevant log tail."""


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(no log: {err})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes]
    started: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)

    def describe(self, lines: int = 40) -> str:
        state = "running" if self.alive() else f"exited with status {self.popen.returncode}"
        return f"{self.name} (pid {self.pid}, {state}); last lines of {self.log}:\n{self.tail(lines)}"

    def check(self) -> None:
        if not self.alive():
            raise HarnessError(f"{self.name} died: {self.describe()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Processes:
    """Every process this session started, in start order."""

    log_dir: Path
    started: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str | Path], env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> Process:
        if not _NAME.fullmatch(name):
            raise ValueError(f"process name {name!r} is not a short lowercase name")
        if any(p.name == name and p.alive() for p in self.started):
            raise ValueError(f"a process named {name!r} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        args = [str(a) for a in argv]
        with log.open("ab") as out:
            out.write(f"# argv: {args!r}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd,
                # Same process group as pytest on purpose: whatever kills the group (Ctrl-C, a CI
                # timeout) kills these too, even when pytest gets no chance to stop them.
            )
        proc = Process(name=name, argv=args, log=log, popen=popen, started=time.monotonic())
        self.started.append(proc)
        return proc

    def get(self, name: str) -> Process:
        for proc in reversed(self.started):
            if proc.name == name:
                return proc
        raise KeyError(name)

    def stop(self, procs: Iterable[Process], grace: float = 10.0) -> None:
        """SIGTERM each (newest first), wait up to `grace` seconds in all, SIGKILL what is left."""
        todo = [p for p in sorted(procs, key=lambda p: p.started, reverse=True) if p.alive()]
        for proc in todo:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in todo:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)

    def stop_all(self, grace: float = 10.0) -> list[str]:
        """Stops everything: API clients first, then the API server, then etcd (start order
        reversed, in tiers so a client never outlives its server). Returns what had to be killed."""
        killed: list[str] = []
        tiers: dict[int, list[Process]] = {}
        for proc in self.started:
            tiers.setdefault(_tier(proc.name), []).append(proc)
        for tier in sorted(tiers):
            for proc in tiers[tier]:
                if proc.alive():
                    with contextlib.suppress(ProcessLookupError):
                        proc.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in tiers[tier]:
                try:
                    proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    killed.append(proc.name)
                    proc.popen.kill()
                    proc.popen.wait(timeout=10)
        return killed

    def still_running(self) -> list[Process]:
        return [p for p in self.started if p.alive()]


def _tier(name: str) -> int:
    if name == "etcd":
        return 2
    if name == "kube-apiserver":
        return 1
    return 0


def wait_for(what: str, check: Callable[[], T | None], timeout: float, *,
             watch: Sequence[Process] = (), interval: float = 0.2) -> T:
    """Poll `check` until it returns a value (not None). Fails at once, with the log tail, when
    a watched process dies; on timeout shows the tails of all watched processes."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        for proc in watch:
            if not proc.alive():
                raise HarnessError(f"waiting for {what}: {proc.name} died: {proc.describe()}")
        try:
            value = check()
        except Exception as err:
            value = None
            last_error = f"{type(err).__name__}: {err}"
        if value is not None:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(p.describe() for p in watch)
            raise HarnessError(
                f"{what} not ready after {timeout:.0f}s" + (f" (last error: {last_error})" if last_error else "")
                + ("\n" + logs if logs else "")
            )
        time.sleep(interval)


class Ports:
    """Distinct free TCP ports on 127.0.0.1 (free when chosen; the process binds a moment later)."""

    def __init__(self) -> None:
        self.taken: set[int] = set()

    def take(self) -> int:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in self.taken:
                self.taken.add(port)
                return port
        raise HarnessError("no free port on 127.0.0.1")
