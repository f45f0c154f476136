"""The README's demo, run against the session guest: PostgreSQL on a volume and on its branch."""

from __future__ import annotations

import io

import pytest

from lab.demo import run_demo
from lab.guest import WORKER_NS, Lab

pytestmark = pytest.mark.lab


def test_demo_branches_postgres_and_leaves_nothing_behind(lab: Lab) -> None:
    lab.start_agent()
    lab.start_controller()
    lab.start_node()
    out = io.StringIO()
    run_demo(lab, out)
    text = out.getvalue()
    # The branch sees the source's rows, and each side sees only its own later writes.
    assert "main:   10001 rows, 0 zeroed, extra: main" in text, text
    assert "branch: 10001 rows, 100 zeroed, extra: branch" in text, text
    assert "demo finished" in text
    # Teardown left no NVMe controller on the worker, no subsystem on the target, no demo zvol.
    assert not lab.run(["ls", "/sys/class/nvme-fabrics/ctl"], check=False).stdout.strip().startswith("nvme")
    assert lab.run(["ls", "/sys/kernel/config/nvmet/subsystems"]).stdout.strip() == ""
    assert lab.run(["nvme", "list-subsys"], netns=WORKER_NS, check=False).stdout.count("nqn.2026-11.io.zvolt") == 0
    listed = lab.run(["zfs", "list", "-H", "-o", "name,zvolt:name", "-t", "all", "-r", f"{lab.pool}/zvolt"]).stdout
    assert "demo-" not in listed, listed
