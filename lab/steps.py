"""Build steps: one progress line per step with elapsed time; a failure names the step and shows its log tail."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO


class StepFailed(RuntimeError):
    def __init__(self, step: str, log: Path, detail: str) -> None:
        self.step = step
        self.log = log
        super().__init__(f"step {step!r} failed: {detail}\n--- last lines of {log} ---\n{tail(log)}")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "step"


def tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(data[-lines:])


# No step stays silent longer than this: a long command (DKMS, debootstrap) gets a line saying
# it still runs, for how long, and the last line of its log.
HEARTBEAT = 30.0


def last_line(path: Path, width: int = 100) -> str:
    """The log's last non-empty line, shortened (read from the end: logs grow to megabytes)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 4096, 0))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    line = lines[-1] if lines else ""
    return line if len(line) <= width else line[: width - 3] + "..."


@dataclass
class Steps:
    log_dir: Path
    out: TextIO = field(default_factory=lambda: sys.stdout)
    t0: float = field(default_factory=time.monotonic)
    current: str = ""
    heartbeat: float = HEARTBEAT
    _open: bool = False  # the step's "name ... " line still waits for its result
    _started: float = 0.0

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{slug(name)}.log"

    @contextmanager
    def step(self, name: str) -> Iterator[Path]:
        """Time a step; exceptions inside become StepFailed naming it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path(name)
        log.write_text("")
        self.current = name
        start = self._started = time.monotonic()
        self.out.write(f"[lab {start - self.t0:7.1f}s] {name} ... ")
        self.out.flush()
        self._open = True
        try:
            yield log
        except StepFailed:
            self._result("FAILED")
            raise
        except Exception as exc:
            self._result("FAILED")
            with log.open("a") as f:
                f.write(f"\nerror: {exc}\n")
            raise StepFailed(name, log, str(exc)) from exc
        self._result(f"ok ({time.monotonic() - start:.1f}s)")

    def _result(self, what: str) -> None:
        if self._open:
            self.out.write(f"{what}\n")
        else:
            self.out.write(f"[lab {time.monotonic() - self.t0:7.1f}s] {self.current} {what}\n")
        self.out.flush()
        self._open = False

    def still_running(self, log: Path) -> None:
        now = time.monotonic()
        if self._open:
            self.out.write("\n")
            self._open = False
        detail = last_line(log)
        self.out.write(f"[lab {now - self.t0:7.1f}s]   {self.current}: still running ({now - self._started:.0f}s)"
                       + (f", log: {detail}" if detail else "") + "\n")
        self.out.flush()

    def note(self, name: str, what: str) -> None:
        """A step that was satisfied from the cache still gets its line."""
        self.out.write(f"[lab {time.monotonic() - self.t0:7.1f}s] {name} ... {what}\n")
        self.out.flush()

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 1800,
        cwd: Path | None = None,
    ) -> None:
        """Run one command of the current step, appending its output to the step's log."""
        log = self.log_path(self.current)
        with log.open("a") as f:
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            # Own process group: a timeout or interrupt ends the whole tree (debootstrap, dpkg, make).
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            )
            deadline = time.monotonic() + timeout
            try:
                while True:
                    left = deadline - time.monotonic()
                    try:
                        rc = proc.wait(timeout=max(min(left, self.heartbeat), 0))
                        break
                    except subprocess.TimeoutExpired:
                        if left <= self.heartbeat:
                            raise
                        f.flush()
                        self.still_running(log)
            except BaseException as exc:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if isinstance(exc, subprocess.TimeoutExpired):
                    raise StepFailed(self.current, log, f"{argv[0]} timed out after {timeout:.0f}s") from exc
                raise
        if rc != 0:
            raise StepFailed(self.current, log, f"{' '.join(argv[:4])} ... exited {rc}")

    def capture(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 600) -> str:
        log = self.log_path(self.current)
        proc = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            env=dict(env) if env is not None else None, timeout=timeout, check=False,
        )
        with log.open("a") as f:
            f.write(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise StepFailed(self.current, log, f"{' '.join(argv[:4])} ... exited {proc.returncode}")
        return proc.stdout


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for chroot/apt commands (the host venv must not leak in)."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
        "DEBIAN_FRONTEND": "noninteractive",
        "TERM": os.environ.get("TERM", "dumb"),
    }
    env.update(extra or {})
    return env
