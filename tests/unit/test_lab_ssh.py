"""ssh command construction for the lab guest."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from lab import ssh


def target() -> ssh.SshTarget:
    return ssh.SshTarget(port=40022, key=Path("/k/id"), control_path=Path("/tmp/c.ctl"))


def remote_words(argv: list[str]) -> list[str]:
    assert argv[-2] == "--"
    return shlex.split(argv[-1])


def test_hostile_words_stay_single_arguments() -> None:
    words = ["echo", "a b", "$(reboot)", "x;y", "'q'", ""]
    assert remote_words(ssh.command_argv(target(), words)) == words


def test_netns_and_timeout_wrap_the_command() -> None:
    got = remote_words(ssh.command_argv(target(), ["zpool", "status"], netns="worker", timeout=30))
    assert got == ["timeout", "-k", "5", "30", "nsenter", "--net=/run/netns/worker", "--", "zpool", "status"]


@pytest.mark.parametrize("bad", ["../x", "Storage", "a b", "", "x" * 20, "w;rm"])
def test_bad_netns_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        ssh.command_argv(target(), ["true"], netns=bad)


def test_empty_command_is_refused() -> None:
    with pytest.raises(ValueError):
        ssh.guest_argv([])


def test_every_call_is_bounded_and_batch() -> None:
    argv = ssh.command_argv(target(), ["true"])
    opts = {argv[i + 1] for i, a in enumerate(argv) if a == "-o"}
    assert {"BatchMode=yes", "ServerAliveInterval=5", "ServerAliveCountMax=3", "ControlMaster=no"} <= opts
    assert any(o.startswith("ConnectTimeout=") for o in opts)
    assert "root@127.0.0.1" in argv and argv[argv.index("-p") + 1] == "40022"


def test_master_is_backgrounded_and_persists_briefly() -> None:
    argv = ssh.master_argv(target(), persist=90)
    assert "-f" in argv and "-N" in argv and "ControlMaster=yes" in argv and "ControlPersist=90" in argv


def test_transport_errors_are_told_apart_from_command_exit_255() -> None:
    assert ssh.is_transport_error("ssh: connect to host 127.0.0.1 port 1: Connection refused\n")
    assert ssh.is_transport_error("kex_exchange_identification: read: Connection reset by peer\n")
    assert not ssh.is_transport_error("Failed to write to /dev/nvme-fabrics: Input/output error\n")


def test_copy_in_is_dd_of_one_quoted_path() -> None:
    words = remote_words(ssh.copy_in_argv(target(), "/tmp/d x/$(reboot);y", timeout=60))
    assert words == ["timeout", "-k", "5", "60", "dd", "of=/tmp/d x/$(reboot);y", "bs=1M", "status=none"]


@pytest.mark.parametrize("bad", ["rel/path", "", "/a\nb", "/a\x00b"])
def test_copy_in_refuses_relative_or_control_paths(bad: str) -> None:
    with pytest.raises(ValueError):
        ssh.copy_in_argv(target(), bad)
