"""One error type for every layer: it carries the gRPC status code the CSI spec names."""

from __future__ import annotations

import grpc


class ZvoltError(Exception):
    """An error with a gRPC status code and a message a user can act on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


# Trailing metadata that carries Moved.to across gRPC (set by zvolt/rpc.py, read by csi/agents.py).
MOVED_TO_KEY = "zvolt-moved-to"


class Moved(ZvoltError):
    """The volume moved to storage node `to` (a tombstone here, agent/moves.py). NOT_FOUND for a
    caller that knows nothing of moves; the controller follows it (csi/locator.py)."""

    def __init__(self, to: str, message: str) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, message)
        self.to = to


def moved(volume_id: str, to: str) -> Moved:
    return Moved(to, f"volume {volume_id} moved to storage node {to}")


def invalid(message: str) -> ZvoltError:
    return ZvoltError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ZvoltError:
    return ZvoltError(grpc.StatusCode.NOT_FOUND, message)


def already_exists(message: str) -> ZvoltError:
    return ZvoltError(grpc.StatusCode.ALREADY_EXISTS, message)


def precondition(message: str) -> ZvoltError:
    return ZvoltError(grpc.StatusCode.FAILED_PRECONDITION, message)


def exhausted(message: str) -> ZvoltError:
    return ZvoltError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def aborted(message: str) -> ZvoltError:
    return ZvoltError(grpc.StatusCode.ABORTED, message)


def unavailable(message: str) -> ZvoltError:
    return ZvoltError(grpc.StatusCode.UNAVAILABLE, message)


def out_of_range(message: str) -> ZvoltError:
    return ZvoltError(grpc.StatusCode.OUT_OF_RANGE, message)


def internal(message: str) -> ZvoltError:
    return ZvoltError(grpc.StatusCode.INTERNAL, message)
