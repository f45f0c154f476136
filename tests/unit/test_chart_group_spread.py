"""The chart carries a StorageClass's groupSpread to the driver, which parses it."""

from __future__ import annotations

import pytest
from test_chart import by_kind, driver_parameters, render  # type: ignore[import-not-found]

from csi import params

SC = {"name": "pg", "volblocksize": "8K", "compression": "lz4", "thin": True, "fsType": "ext4",
      "reclaimPolicy": "Delete"}


@pytest.mark.parametrize("spread", params.GROUP_SPREADS)
def test_group_spread_reaches_the_driver(spread: str) -> None:
    sc = by_kind(render({"storageClasses": [{**SC, "groupSpread": spread}]}), "StorageClass")["pg"]
    assert sc["parameters"]["groupSpread"] == spread
    assert params.parse(driver_parameters(sc)).group_spread == spread
    assert "groupSpread" not in by_kind(render(), "StorageClass")["zvolt"]["parameters"]


def test_schema_refuses_a_spread_the_driver_would() -> None:
    with pytest.raises(Exception, match="groupSpread"):
        render({"storageClasses": [{**SC, "groupSpread": "always"}]})
