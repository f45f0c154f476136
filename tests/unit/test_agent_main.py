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
