"""Start-up restore on the real stack: one broken published volume does not keep the rest of
the storage node offline after a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_agent_lab import PARENT, Env, host_nqn, uniq, vds, wait_ready  # type: ignore[import-not-found]
from test_faults_lab import WIPE, report  # type: ignore[import-not-found]

from zvolt.pb import agent_pb2 as pb

pytestmark = pytest.mark.lab

LINKED = """
from agent import nvmet
for port in nvmet.Root().ports():
    print(*port.subsystems())
"""


@pytest.fixture(scope="module")
def env(lab: Any) -> Iterator[Env]:
    e = Env(lab)
    e.restart()
    wait_ready(e.stub)
    yield e
    e.restart()
    wait_ready(e.stub)
    e.channel.close()


def test_one_broken_published_volume_does_not_keep_the_node_offline(env: Env) -> None:
    """Simulated reboot (agent SIGKILLed, nvmet configfs wiped) with one published zvol renamed
    away behind the agent's back: the agent turns ready with the other exports restored and
    linked, reports the broken one as abnormal, and restores it once the zvol is back."""
    host = host_nqn()
    vols = [env.create(uniq(f"rs{i}"), 64 * 1024 * 1024) for i in range(3)]
    pubs = [env.publish(v.id, host) for v in vols]
    bad, aside = vols[1], f"{PARENT}/aside-{vols[1].id}"
    try:
        env.lab.stop_service("agent", kill=True)
        assert env.lab.py(WIPE).stdout.split() == ["0", "0", "0"]
        env.lab.run(["zfs", "rename", vds(bad.id), aside])
        start = time.monotonic()
        # A short device wait and retry tick, so the broken volume costs seconds here.
        env.restart("--device-timeout", "5", "--gc-interval", "3")
        wait_ready(env.stub)
        ready_s = time.monotonic() - start
        good = [p.nqn for v, p in zip(vols, pubs, strict=True) if v.id != bad.id]
        assert set(good) <= set(env.subsystems())
        for nqn in good:
            assert env.allowed(nqn) == [host]
        linked = env.lab.py(LINKED).stdout.split()
        assert set(good) <= set(linked), linked
        broken = env.get(bad.id)
        assert broken.condition == pb.VOLUME_CONDITION_ABNORMAL
        assert broken.condition_message == f"dataset {vds(bad.id)} is missing in ZFS", broken.condition_message
        env.lab.run(["zfs", "rename", aside, vds(bad.id)])
        deadline = time.monotonic() + 120
        while env.get(bad.id).condition != pb.VOLUME_CONDITION_HEALTHY and time.monotonic() < deadline:
            time.sleep(1)
        assert env.get(bad.id).condition == pb.VOLUME_CONDITION_HEALTHY
        healed_s = time.monotonic() - start
    finally:
        if env.lab.run(["zfs", "list", aside], check=False).returncode == 0:
            env.lab.run(["zfs", "rename", aside, vds(bad.id)])
    for v in vols:
        env.unpublish(v.id, host)
        env.delete(v.id)
    report("one broken published volume at start-up",
           f"ready after {ready_s:.1f}s with the 2 other exports restored and linked; the broken one abnormal, "
           f"restored {healed_s - ready_s:.1f}s after its zvol came back")
