"""A storage node that does not answer holds up only the creates whose placement record
(csi/placements.py) names it; every other create goes to the nodes that answer."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from csi.fakes import FakeAgent, serve_fake_agent
from csi.placements import decode, encode
from zvolt.errors import ZvoltError, unavailable
from zvolt.pb import csi_pb2

META = {"csi.storage.k8s.io/pvc/name": "pgdata", "csi.storage.k8s.io/pvc/namespace": "team-a"}


class Records:
    def __init__(self) -> None:
        self.saved: dict[tuple[str, str], tuple[str, str]] = {}
        self.broken = False

    def get(self, namespace: str, pvc: str) -> tuple[str, str] | None:
        return self.saved.get((namespace, pvc))

    def put(self, namespace: str, pvc: str, name: str, node: str) -> None:
        if self.broken:
            raise unavailable("cannot record the placement: API server down")
        self.saved[(namespace, pvc)] = (name, node)


@pytest.fixture
def cluster(sockdir: str) -> Iterator[tuple[FakeAgent, ControllerService, Records]]:
    live = FakeAgent("storage-0")
    server = serve_fake_agent(live, f"{sockdir}/s0.sock")
    # storage-1 is discovered (its pod is Running) but nothing answers at its address.
    pool = AgentPool(lambda: parse_static(f"storage-0=unix://{sockdir}/s0.sock,storage-1=unix://{sockdir}/dead.sock"),
                     tls=None, timeout=5)
    records = Records()
    yield live, ControllerService(pool, records=records), records
    pool.close()
    server.stop(None)


def request(name: str, meta: dict[str, str] | None = META) -> csi_pb2.CreateVolumeRequest:
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=csi_pb2.VolumeCapability.
                                   AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    return csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap], parameters=meta or {})


def code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except ZvoltError as err:
        return err.code
    return grpc.StatusCode.OK


def test_a_create_never_sent_anywhere_goes_to_the_nodes_that_answer(
        cluster: tuple[FakeAgent, ControllerService, Records]) -> None:
    live, ctrl, records = cluster
    vol = ctrl.CreateVolume(request("pvc-1"), None).volume
    assert vol.volume_id.startswith("storage-0/") and len(live.state.volumes) == 1
    assert records.saved == {("team-a", "pgdata"): ("pvc-1", "storage-0")}  # written before the agent call
    assert ctrl.CreateVolume(request("pvc-1"), None).volume.volume_id == vol.volume_id  # retry: same volume


def test_a_create_first_sent_to_the_silent_node_waits_for_it(
        cluster: tuple[FakeAgent, ControllerService, Records]) -> None:
    live, ctrl, records = cluster
    records.saved[("team-a", "pgdata")] = ("pvc-2", "storage-1")  # the first attempt's answer was lost
    with pytest.raises(ZvoltError) as err:
        ctrl.CreateVolume(request("pvc-2"), None)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "storage-1" in err.value.message
    assert not live.state.volumes  # no second copy
    # A record of another volume name (an older PVC of the same name) does not hold it up.
    records.saved[("team-a", "pgdata")] = ("pvc-old", "storage-1")
    assert ctrl.CreateVolume(request("pvc-2"), None).volume.volume_id.startswith("storage-0/")


def test_without_a_record_or_a_pvc_the_controller_stays_strict(
        cluster: tuple[FakeAgent, ControllerService, Records]) -> None:
    live, ctrl, records = cluster
    assert code(lambda: ctrl.CreateVolume(request("pvc-3", meta=None), None)) == grpc.StatusCode.UNAVAILABLE
    records.broken = True  # the record cannot be written: nothing is created
    assert code(lambda: ctrl.CreateVolume(request("pvc-4"), None)) == grpc.StatusCode.UNAVAILABLE
    assert not live.state.volumes


def test_record_format() -> None:
    assert decode(encode("pvc-1", "storage-0")) == ("pvc-1", "storage-0")
    assert decode("") is None and decode("junk") is None and decode("=x") is None
