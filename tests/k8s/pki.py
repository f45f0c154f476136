"""The control plane's certificates, made with the `openssl` command (argv, no shell): a CA,
the API server's serving certificate, client certificates, and the service-account key pair.
A private openssl config keeps the result independent of the system's openssl.cnf."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import HarnessError

DAYS = "2"  # one test session; short-lived on purpose

_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
"""


def openssl(*args: str | Path, cwd: Path) -> str:
    exe = shutil.which("openssl")
    if exe is None:
        raise HarnessError("openssl not found on PATH (Debian: apt-get install openssl)")
    argv = [exe, *(str(a) for a in args)]
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise HarnessError(f"openssl failed (exit {result.returncode}): {argv}\n{result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


class Pki:
    """Files in `root`: ca.crt/ca.key, sa.key/sa.pub, and NAME.crt/NAME.key per issued cert."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "openssl.cnf"
        self.config.write_text(_CONFIG)
        self.ca = CertPair(root / "ca.crt", root / "ca.key")
        openssl(
            "req", "-x509", "-new", "-config", self.config, "-extensions", "ca",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", self.ca.key, "-out", self.ca.cert, "-days", DAYS, "-sha256",
            "-subj", "/CN=zvolt-test-ca", cwd=root,
        )
        # Service-account token signing key (RS256, as kubeadm makes it).
        self.sa_key = root / "sa.key"
        self.sa_pub = root / "sa.pub"
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", self.sa_key, cwd=root)
        openssl("pkey", "-in", self.sa_key, "-pubout", "-out", self.sa_pub, cwd=root)

    def issue(self, name: str, subject: str, *, server_sans: tuple[str, ...] = (), client: bool = True) -> CertPair:
        """A leaf certificate signed by the CA. `subject` like "/O=system:masters/CN=admin";
        `server_sans` like ("IP:127.0.0.1", "DNS:localhost") make it a serving certificate."""
        pair = CertPair(self.root / f"{name}.crt", self.root / f"{name}.key")
        csr = self.root / f"{name}.csr"
        usages = (["serverAuth"] if server_sans else []) + (["clientAuth"] if client else [])
        ext = [
            "[leaf]",
            "basicConstraints = critical,CA:FALSE",
            "keyUsage = critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage = {','.join(usages)}",
            "authorityKeyIdentifier = keyid",
        ]
        if server_sans:
            ext.append(f"subjectAltName = {','.join(server_sans)}")
        extfile = self.root / f"{name}.ext"
        extfile.write_text("\n".join(ext) + "\n")
        openssl(
            "req", "-new", "-config", self.config, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", pair.key, "-out", csr, "-subj", subject, cwd=self.root,
        )
        openssl(
            "x509", "-req", "-in", csr, "-CA", self.ca.cert, "-CAkey", self.ca.key,
            "-set_serial", "0x" + secrets.token_hex(16), "-days", DAYS, "-sha256",
            "-extfile", extfile, "-extensions", "leaf", "-out", pair.cert, cwd=self.root,
        )
        csr.unlink()
        return pair
