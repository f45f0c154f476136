"""mTLS: with --tls-* the agent serves only clients that present a certificate from the CA."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import grpc
import pytest

from agent import nvmet
from agent.fakes import FakeZfs
from agent.index import Index
from agent.main import build, parse_settings
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make test certs")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _pki(d: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=zvolt-test-ca", cwd=d)
    for name, san in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "subjectAltName=DNS:controller")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mtls_required(tmp_path: Path) -> None:
    _pki(tmp_path)
    port = _free_port()
    s = parse_settings(["--node-name", "storage-0", "--pool", "tank", "--nvme-listen", "10.42.0.1:4420",
                        "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "st"),
                        "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
                        "--tls-ca", str(tmp_path / "ca.pem")], env={})
    zfs = FakeZfs()
    zfs.create_filesystem("tank")
    root = nvmet.Root(str(tmp_path / "cfs"), emulate=True)
    root.init_tree()
    agent = build(s, zfs, root, Index(s.state_dir))
    agent.server.start()
    agent.recovery.run()
    ca = (tmp_path / "ca.pem").read_bytes()
    try:
        good = grpc.ssl_channel_credentials(ca, (tmp_path / "client.key").read_bytes(),
                                            (tmp_path / "client.pem").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", good) as ch:
            assert pb_grpc.AgentStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10).ready
        no_cert = grpc.ssl_channel_credentials(ca)
        with grpc.secure_channel(f"127.0.0.1:{port}", no_cert) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.AgentStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError):
            pb_grpc.AgentStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
    finally:
        agent.server.stop(None)
