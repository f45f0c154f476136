"""How adapters execute argv: no shell, a timeout, captured output, errors as ZvoltError."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from zvolt.errors import ZvoltError


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], timeout: float) -> Result: ...


def subprocess_runner(argv: Sequence[str], timeout: float) -> Result:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise ZvoltError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{argv[0]} did not finish in {timeout:.0f}s") from err
    except FileNotFoundError as err:
        raise ZvoltError(grpc.StatusCode.FAILED_PRECONDITION, f"{argv[0]} is not installed on this node") from err
    return Result(done.returncode, done.stdout, done.stderr)


def check(result: Result, argv: Sequence[str], what: str) -> Result:
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ZvoltError(
            grpc.StatusCode.INTERNAL,
            f"{what} failed ({argv[0]} exit {result.returncode}): {detail[-1] if detail else 'no output'}",
        )
    return result
