import grpc
import pytest

from zvolt import names
from zvolt.errors import ZvoltError


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "A", "x" * 64, "-a", "a\x00b", "a b", "a@b", "é"])
def test_bad_ids_are_invalid_argument(bad: str) -> None:
    with pytest.raises(ZvoltError) as err:
        names.check_id(bad)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_id_for_name_is_stable_and_valid() -> None:
    a = names.id_for_name("pvc-123")
    assert a == names.id_for_name("pvc-123")
    assert a != names.id_for_name("pvc-124")
    assert names.check_id(a) == a


def test_split_ids_roundtrip() -> None:
    assert names.split_volume_id("node-1/vabc") == ("node-1", "vabc")
    assert names.split_snapshot_id("node-1/vabc@sdef") == ("node-1", "vabc", "sdef")
    for bad in ["vabc", "node-1/", "/vabc", "node-1/v/../x", "node-1/vabc@", "Node/vabc"]:
        with pytest.raises(ZvoltError):
            names.split_snapshot_id(bad) if "@" in bad else names.split_volume_id(bad)


@pytest.mark.parametrize(
    "nqn", ["nqn.2026-11.io.zvolt:node-1:vabc", "nqn.2014-08.org.nvmexpress:uuid:0f8fad5b-d9cb-469f-a165-70867728950e"]
)
def test_good_nqns(nqn: str) -> None:
    assert names.check_nqn(nqn) == nqn


@pytest.mark.parametrize("nqn", ["", "nqn", "nqn.2026-11.io.zvolt:a/b", "nqn.2026-11.io.zvolt:" + "a" * 220, "x\n"])
def test_bad_nqns(nqn: str) -> None:
    with pytest.raises(ZvoltError):
        names.check_nqn(nqn)
