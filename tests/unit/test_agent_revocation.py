"""Revocation on fakes: an unpublished host loses the controllers it has, not only its next connect.

The kernel facts behind it (lab, 6.12) are in agent/exports.py; tests/lab/test_revocation_lab.py
checks them on the real stack. Here: when the agent ends a subsystem's controllers
(`Subsystem.reset_controllers`), in what order, and that nothing else does.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from agent import nvmet
from agent.fakes import FakeNode, make_node
from agent.volumes import VolumeSpec
from zvolt.errors import ZvoltError

GiB = 1 << 30
HOST_A = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-000000000001"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-4000-8000-000000000002"
STRANGER = "nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-4000-8000-000000000003"


class Resets:
    """Spy on reset_controllers: for each call, the subsystem and its allowed hosts at that moment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: int = 0) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.fail = fail  # the first `fail` calls raise, as a configfs write error would
        real = nvmet.Subsystem.reset_controllers

        def spy(sub: nvmet.Subsystem) -> None:
            self.calls.append((sub.nqn, sub.allowed_hosts()))
            if self.fail:
                self.fail -= 1
                raise OSError(5, "Input/output error")
            real(sub)

        monkeypatch.setattr(nvmet.Subsystem, "reset_controllers", spy)


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return make_node(str(tmp_path / "state"), str(tmp_path / "configfs"))


def _shared(node: FakeNode) -> tuple[str, str]:
    vol = node.volumes.create_volume(VolumeSpec(name="shared", size=GiB))
    nqn = node.volumes.publish(vol.id, HOST_A)
    assert node.volumes.publish(vol.id, HOST_B) == nqn  # one subsystem, one NQN for every host
    return vol.id, nqn


def test_unpublishing_one_of_two_hosts_ends_the_subsystems_controllers_after_the_unlink(
        node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    vid, nqn = _shared(node)
    resets = Resets(monkeypatch)
    node.volumes.unpublish(vid, HOST_A)
    # Exactly one reset, and A was already off the list: its reconnect is refused.
    assert resets.calls == [(nqn, [HOST_B])]
    assert node.volumes.get_volume(vid).healthy
    assert node.zfs.ds[node.volumes.index.volume(vid).dataset].props["zvolt:hosts"] == HOST_B  # type: ignore[union-attr]
    # The subsystem, its namespace and its port link are untouched: B keeps its NQN and device.
    sub = node.root.subsystem(nqn)
    assert sub.namespace(1).enabled and sub.allowed_hosts() == [HOST_B]
    assert os.path.exists(os.path.join(node.root.path, "hosts", HOST_B))
    assert not os.path.exists(os.path.join(node.root.path, "hosts", HOST_A))


def test_reset_writes_back_the_value_it_read(node: FakeNode) -> None:
    vid, nqn = _shared(node)
    sub = node.root.subsystem(nqn)
    sub.set_attr("qid_max", "7")  # whatever the subsystem has, it keeps
    node.volumes.unpublish(vid, HOST_A)
    assert sub.attr("qid_max") == "7"


def test_publish_repeats_restarts_and_the_last_unpublish_do_not_reset(
        node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resets = Resets(monkeypatch)
    vid, nqn = _shared(node)  # adding a host: nobody loses anything
    node.volumes.publish(vid, HOST_A)  # idempotent repeat
    restarted = node.restart(str(tmp_path / "state"))  # restore on an intact tree: hosts stay connected
    assert restarted.readiness.ready
    assert resets.calls == []
    restarted.volumes.unpublish(vid, HOST_A)
    assert len(resets.calls) == 1
    # The last host: the subsystem goes (its port unlink ends the controllers), no reset needed.
    restarted.volumes.unpublish(vid, HOST_B)
    assert len(resets.calls) == 1 and not restarted.root.subsystem(nqn).exists()


def test_a_repeated_unpublish_does_not_reset_again(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    vid, _ = _shared(node)
    resets = Resets(monkeypatch)
    node.volumes.unpublish(vid, HOST_A)
    node.volumes.unpublish(vid, HOST_A)  # recorded as done: nothing to remove, nothing to end
    assert len(resets.calls) == 1


def test_an_unpublish_whose_reset_failed_resets_on_the_retry(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    vid, nqn = _shared(node)
    resets = Resets(monkeypatch, fail=1)
    with pytest.raises(ZvoltError) as err:
        node.volumes.unpublish(vid, HOST_A)
    assert err.value.code == grpc.StatusCode.INTERNAL
    # A is already off the list but still recorded as published: the CO retries.
    assert node.root.subsystem(nqn).allowed_hosts() == [HOST_B]
    assert node.volumes.index.volume(vid).hosts == [HOST_A, HOST_B]  # type: ignore[union-attr]
    assert node.volumes.index.intents() == []  # the intent was settled
    node.volumes.unpublish(vid, HOST_A)
    # The retry removes nothing new, and still ends the controllers A may have kept.
    assert resets.calls == [(nqn, [HOST_B]), (nqn, [HOST_B])]
    assert node.volumes.index.volume(vid).hosts == [HOST_B]  # type: ignore[union-attr]


def test_a_host_found_on_the_list_without_a_publish_loses_its_controllers(
        node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, nqn = _shared(node)
    sub = node.root.subsystem(nqn)
    sub.allow_host(node.root.host(STRANGER))  # drift: a link the agent never made
    resets = Resets(monkeypatch)
    restarted = node.restart(str(tmp_path / "state"))
    assert restarted.readiness.ready
    assert resets.calls == [(nqn, [HOST_A, HOST_B])]
    assert sub.allowed_hosts() == sorted([HOST_A, HOST_B])


def test_a_kernel_without_attr_qid_max_fails_the_unpublish_loudly(
        node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vid, _ = _shared(node)
    # Not emulated: a missing attribute is what the real configfs of an older kernel shows.
    monkeypatch.setattr(node.volumes.exports, "root", nvmet.Root(node.root.path))
    with pytest.raises(ZvoltError) as err:
        node.volumes.unpublish(vid, HOST_A)
    assert err.value.code == grpc.StatusCode.INTERNAL and "attr_qid_max" in err.value.message
    assert node.volumes.index.volume(vid).hosts == [HOST_A, HOST_B]  # type: ignore[union-attr]


def test_a_subsystem_found_open_to_any_host_is_closed_and_its_controllers_ended(
        node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    vid, nqn = _shared(node)
    sub = node.root.subsystem(nqn)
    for h in (HOST_A, HOST_B):  # the kernel takes allow_any_host=1 only with an empty list
        sub.disallow_host(h)
    sub.set_attr("allow_any_host", "1")  # tampering: anyone may have connected meanwhile
    resets = Resets(monkeypatch)
    node.volumes.publish(vid, HOST_A)  # the repeat repairs
    assert sub.attr("allow_any_host") == "0"
    assert resets.calls == [(nqn, sorted([HOST_A, HOST_B]))]
