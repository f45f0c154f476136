"""One rule each, shared by the agent and the controller: block-size round-up, snapshot ids."""

from __future__ import annotations

import pytest

from zvolt import names, volprops
from zvolt.errors import ZvoltError


@pytest.mark.parametrize(("value", "align", "want"),
                         [(0, 8192, 0), (1, 8192, 8192), (8192, 8192, 8192), (8193, 8192, 16384),
                          ((1 << 30) + 1, 16384, (1 << 30) + 16384)])
def test_round_up(value: int, align: int, want: int) -> None:
    assert volprops.round_up(value, align) == want


def test_split_local_snapshot_id() -> None:
    assert names.split_local_snapshot_id("vabc@sdef") == ("vabc", "sdef")
    for bad in ["", "vabc", "vabc@", "@sdef", "node-1/vabc@sdef", "vabc@s/x", "Vabc@sdef"]:
        with pytest.raises(ZvoltError):
            names.split_local_snapshot_id(bad)
    with pytest.raises(ZvoltError, match="<volume id>@<snapshot>"):
        names.split_local_snapshot_id("vabc")


def test_csi_snapshot_id_is_a_node_prefix_on_a_local_snapshot_id() -> None:
    assert names.split_snapshot_id("node-1/vabc@sdef") == ("node-1", "vabc", "sdef")
    for bad in ["node-1/vabc", "vabc@sdef", "node-1/vabc@", "node-1/v/x@sdef", "Node/vabc@sdef", "node-1/vabc@s@t"]:
        with pytest.raises(ZvoltError):
            names.split_snapshot_id(bad)
    with pytest.raises(ZvoltError, match="<storage-node>/<id>@<snap>"):
        names.split_snapshot_id("node-1/vabc")
