"""After a reboot no subsystem is reachable through the port before every subsystem is complete.

A Linux host reconnecting to an enabled port whose subsystem is not linked (yet) gets "invalid
subsystem" with DNR and deletes its controller for good; the lab's reboot scenario
(tests/lab/test_faults_lab.py) shows the same on the real stack.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from agent import nvmet
from agent.fakes import make_node
from agent.volumes import VolumeSpec

HOST = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-000000000001"


def test_restore_links_the_port_only_after_all_subsystems_are_built(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"))
    ids = []
    for i in range(4):
        rec = node.volumes.create_volume(VolumeSpec(name=f"r{i}", size=1 << 30))
        node.volumes.publish(rec.id, HOST)
        ids.append(rec.id)
    # Reboot: configfs is empty again.
    shutil.rmtree(node.root.path)
    node.root.init_tree()

    seen: list[tuple[str, list[str]]] = []
    original = nvmet.Port.add_subsystem

    def spy(port: nvmet.Port, sub: nvmet.Subsystem) -> None:
        complete = []
        for vid in ids:
            s = node.root.subsystem(node.volumes.exports.nqn(vid))
            ns = s.namespace(1)
            if s.exists() and ns.exists() and ns.enabled and s.allowed_hosts() == [HOST]:
                complete.append(vid)
        seen.append((sub.nqn, complete))
        original(port, sub)

    monkeypatch.setattr(nvmet.Port, "add_subsystem", spy)
    restarted = node.restart(str(tmp_path / "s"))
    assert restarted.readiness.ready
    assert len(seen) == len(ids)
    for nqn, complete in seen:
        assert sorted(complete) == sorted(ids), f"{nqn} linked while only {complete} were complete"
    port = restarted.root.find_port("10.42.0.1", "4420")
    assert port is not None
    assert sorted(port.subsystems()) == sorted(restarted.volumes.exports.nqn(v) for v in ids)
    assert all(os.path.islink(os.path.join(port.path, "subsystems", n)) for n in port.subsystems())
