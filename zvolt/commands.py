"""How zvolt's host adapters (nft, ip) run a program: an argv list, optional stdin text, a
timeout, captured output. Never a shell: nothing a value contains can become a command."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class CommandError(RuntimeError):
    """The program could not be run at all, or did not finish in time."""


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30.0) -> Result: ...


def subprocess_runner(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30.0) -> Result:
    argv = list(argv)
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise CommandError(f"{argv[0]} did not finish in {timeout:.0f} s") from err
    except FileNotFoundError as err:
        raise CommandError(f"{argv[0]} is not installed (not found on PATH)") from err
    return Result(done.returncode, done.stdout, done.stderr)
