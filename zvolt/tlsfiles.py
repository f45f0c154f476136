"""mTLS credentials read from files that may be replaced while the process runs.

Kubernetes updates a mounted Secret in place (cert-manager renewals, a `helm upgrade` that
rotates keys). Reading the files again when they change lets the agent and the controller take
new certificates without a restart: the agent's server credentials ask `changed()` on every
new connection (gRPC's certificate-config fetcher); the controller rebuilds its channels when
`changed()` says so. During a CA rotation, the CA file holds both CAs.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str
    server_name: str = ""  # client side: overrides the name checked in the server's certificate


class Watched:
    """The three files and the version of them last loaded (mtime and size of each)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._mu = threading.Lock()
        self._seen: tuple[tuple[int, int], ...] | None = None

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in (self.files.cert, self.files.key, self.files.ca):
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def load(self) -> tuple[bytes, bytes, bytes]:
        """(cert, key, ca) as they are now; remembered as the version in use."""
        with self._mu:
            stamp = self._stamp()
            data = tuple(Path(p).read_bytes() for p in (self.files.cert, self.files.key, self.files.ca))
            self._seen = stamp
            return data[0], data[1], data[2]

    def changed(self) -> bool:
        """True if a file changed since the last load (a half-written set is caught at load)."""
        try:
            stamp = self._stamp()
        except OSError:
            return False  # mid-replacement (Kubernetes swaps a symlink): keep what works
        with self._mu:
            return stamp != self._seen


def server_credentials(watched: Watched) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate and reload changed files."""
    def config(cert: bytes, key: bytes, ca: bytes) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        if not watched.changed():
            return None  # gRPC keeps the current configuration
        try:
            return config(*watched.load())
        except (OSError, ValueError):
            return None

    return grpc.dynamic_ssl_server_credentials(config(*watched.load()), fetch,
                                               require_client_authentication=True)


def channel_credentials(watched: Watched) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
    cert, key, ca = watched.load()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    name = watched.files.server_name
    return creds, [("grpc.ssl_target_name_override", name)] if name else []
