"""Agent settings: flags, ZVOLT_* environment, JSON config file, and the mTLS refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.main import parse_settings

BASE = ["--node-name", "storage-0", "--pool", "tank", "--nvme-listen", "10.42.0.1:4420"]


def test_flags_and_defaults() -> None:
    s = parse_settings([*BASE, "--insecure"], env={})
    assert s.parent == "tank/zvolt" and s.listen == "0.0.0.0:7001" and s.metrics_listen == "0.0.0.0:9101"
    assert (s.nvme_address, s.nvme_port) == ("10.42.0.1", "4420")
    assert s.tls is None and not s.rebuild_index


def test_env_and_config_file_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.json"
    cfg.write_text(json.dumps({"node_name": "from-file", "pool": "tank", "nvme-listen": "10.0.0.1:4420",
                               "insecure": True, "parent": "tank/file"}))
    env = {"ZVOLT_CONFIG": str(cfg), "ZVOLT_NODE_NAME": "from-env", "ZVOLT_STATE_DIR": "/tmp/x"}
    s = parse_settings(["--parent", "tank/flag"], env=env)
    assert s.node == "from-env"  # env beats file
    assert s.parent == "tank/flag"  # flag beats file
    assert s.state_dir == "/tmp/x" and s.nvme_address == "10.0.0.1"


@pytest.mark.parametrize(
    "argv",
    [
        BASE,  # neither TLS nor --insecure
        [*BASE, "--tls-cert", "c.pem", "--insecure"],  # partial TLS
        ["--pool", "tank", "--nvme-listen", "1.2.3.4:4420", "--insecure"],  # no node name
        [*BASE, "--insecure", "--parent", "other/zvolt"],  # parent outside the pool
        [*BASE, "--insecure", "--node-name", "Bad_Name"],
        [*BASE, "--insecure", "--nvme-listen", "1.2.3.4"],
        [*BASE, "--insecure", "--listen", "unix://relative"],
    ],
)
def test_bad_settings_refuse_to_start(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv, env={})


def test_tls_settings() -> None:
    s = parse_settings([*BASE, "--tls-cert", "c", "--tls-key", "k", "--tls-ca", "ca"], env={})
    assert s.tls == ("c", "k", "ca")


def test_build_serves_on_a_unix_socket_and_becomes_ready(tmp_path: Path) -> None:
    import grpc

    from agent import nvmet
    from agent.fakes import FakeZfs
    from agent.index import Index
    from agent.main import build
    from zvolt.pb import agent_pb2 as pb
    from zvolt.pb import agent_pb2_grpc as pb_grpc

    sock = tmp_path / "run" / "agent.sock"
    s = parse_settings([*BASE, "--insecure", "--listen", f"unix://{sock}", "--state-dir", str(tmp_path / "st")],
                       env={})
    zfs = FakeZfs()
    zfs.create_filesystem("tank")
    root = nvmet.Root(str(tmp_path / "cfs"), emulate=True)
    root.init_tree()
    agent = build(s, zfs, root, Index(s.state_dir))
    agent.server.start()
    try:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            stub = pb_grpc.AgentStub(ch)
            assert not stub.GetInfo(pb.GetInfoRequest(), timeout=10).ready
            agent.recovery.run()
            agent.servicer.refresh_metrics()
            assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).ready
            assert agent.metrics.registry.get_sample_value("zvolt_agent_pool_free_bytes") is not None
    finally:
        agent.server.stop(None)
