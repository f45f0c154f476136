"""The only place that builds ssh argv to the guest. Every call is bounded in time."""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_NETNS = re.compile(r"^[a-z][a-z0-9-]{0,14}$")
# Headroom between the guest-side `timeout` and the host-side hard kill of ssh.
HOST_GRACE = 15.0


_TRANSPORT_ERRORS = re.compile(
    r"^(ssh: |kex_exchange_identification|Connection (closed|reset|timed out)|mux_client|ControlSocket|"
    r"Connection to \S+ closed by remote host|Timeout, server \S+ not responding)",
    re.MULTILINE,
)


def is_transport_error(stderr: str) -> bool:
    """ssh exits 255 both for its own failures and when the remote command does: tell them apart."""
    return bool(_TRANSPORT_ERRORS.search(stderr))


def check_netns(name: str) -> str:
    if not _NETNS.fullmatch(name):
        raise ValueError(f"network namespace name {name!r} is not valid")
    return name


@dataclass(frozen=True)
class SshTarget:
    port: int
    key: Path
    control_path: Path
    host: str = "127.0.0.1"
    user: str = "root"

    def options(self, connect_timeout: int = 10) -> list[str]:
        return [
            "-i", str(self.key),
            "-p", str(self.port),
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
            "-o", f"ControlPath={self.control_path}",
        ]


def guest_argv(argv: Sequence[str], *, netns: str | None = None, timeout: float | None = None) -> list[str]:
    """The command as run in the guest: in a namespace and under a guest-side timeout."""
    if not argv:
        raise ValueError("empty command")
    cmd = list(argv)
    if netns is not None:
        cmd = ["nsenter", f"--net=/run/netns/{check_netns(netns)}", "--", *cmd]
    if timeout is not None:
        cmd = ["timeout", "-k", "5", f"{max(1, int(timeout))}", *cmd]
    return cmd


def command_argv(
    target: SshTarget, argv: Sequence[str], *, netns: str | None = None, timeout: float | None = None
) -> list[str]:
    # ssh hands the remote side one string for its shell: quote every word ourselves.
    remote = shlex.join(guest_argv(argv, netns=netns, timeout=timeout))
    return ["ssh", *target.options(), "-o", "ControlMaster=no", f"{target.user}@{target.host}", "--", remote]


def forward_argv(target: SshTarget, local_port: int, guest_port: int) -> list[str]:
    """A dedicated ssh (no multiplexing: it lives exactly as long as its process) that forwards
    127.0.0.1:local_port on the host to 127.0.0.1:guest_port in the guest."""
    for port in (local_port, guest_port):
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range")
    # ssh takes the first value given for an option: ControlPath=none wins over options().
    return ["ssh", "-o", "ControlPath=none", *target.options(), "-o", "ExitOnForwardFailure=yes", "-N",
            "-L", f"127.0.0.1:{local_port}:127.0.0.1:{guest_port}", f"{target.user}@{target.host}"]


def check_guest_path(path: str) -> str:
    if not path.startswith("/") or "\x00" in path or "\n" in path:
        raise ValueError(f"guest path {path!r} must be absolute, without NUL or newline")
    return path


def copy_in_argv(target: SshTarget, dest: str, *, timeout: float | None = None) -> list[str]:
    """ssh argv that writes its stdin to the guest file `dest` (dd: argv only, no remote shell)."""
    return command_argv(target, ["dd", f"of={check_guest_path(dest)}", "bs=1M", "status=none"], timeout=timeout)


def master_argv(target: SshTarget, persist: int = 120) -> list[str]:
    return [
        "ssh", *target.options(), "-o", "ControlMaster=yes", "-o", f"ControlPersist={persist}",
        "-f", "-N", f"{target.user}@{target.host}",
    ]


def ensure_master(target: SshTarget) -> None:
    """One multiplexed connection makes each guest command cheap (no handshake under TCG)."""
    if target.control_path.exists():
        check = subprocess.run(
            ["ssh", "-o", f"ControlPath={target.control_path}", "-O", "check", f"{target.user}@{target.host}"],
            capture_output=True, timeout=10, check=False, stdin=subprocess.DEVNULL,
        )
        if check.returncode == 0:
            return
    # The master outlives this call: it must not hold our pipes open. If it cannot connect,
    # the command that follows connects on its own and reports the failure.
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            master_argv(target), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=30, check=False,
        )


def close_master(target: SshTarget) -> None:
    subprocess.run(
        ["ssh", "-o", f"ControlPath={target.control_path}", "-O", "exit", f"{target.user}@{target.host}"],
        capture_output=True, timeout=10, check=False, stdin=subprocess.DEVNULL,
    )
