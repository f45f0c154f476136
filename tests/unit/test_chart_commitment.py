"""The chart carries the commitment limits: the agent's flags and a StorageClass's own limit,
which the driver then parses."""

from __future__ import annotations

import pytest
from test_chart import RELEASE, by_kind, container, driver_parameters, render  # type: ignore[import-not-found]

from csi import params

SC = {"name": "strict", "volblocksize": "8K", "compression": "lz4", "thin": True, "fsType": "ext4",
      "reclaimPolicy": "Delete", "commitmentRatio": 1.5}


def test_agent_flags_and_class_limit_reach_their_readers() -> None:
    docs = render({"agent": {"commitmentRatio": 2.5, "growthReserve": 0.1}, "storageClasses": [SC]})
    spec = by_kind(docs, "DaemonSet")[f"{RELEASE}-zvolt-agent"]["spec"]["template"]["spec"]
    args = container(spec, "zvolt-agent")["args"]
    assert "--commitment-ratio=2.5" in args and "--growth-reserve=0.1" in args
    sc = by_kind(docs, "StorageClass")["strict"]
    assert sc["parameters"]["commitmentRatio"] == "1.5"
    assert params.parse(driver_parameters(sc)).commitment_ratio == 1.5
    plain = by_kind(render(), "StorageClass")["zvolt"]
    assert "commitmentRatio" not in plain["parameters"]


@pytest.mark.parametrize("values", [
    {"agent": {"commitmentRatio": 0}},
    {"agent": {"growthReserve": 1}},
    {"storageClasses": [{**SC, "commitmentRatio": -1}]},
])
def test_schema_refuses_limits_the_agent_or_driver_would(values: dict[str, object]) -> None:
    with pytest.raises(Exception, match=r"commitmentRatio|growthReserve"):
        render(values)
