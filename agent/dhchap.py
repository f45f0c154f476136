"""DH-HMAC-CHAP (NVMe in-band authentication): the secret format, and the keys of the nvmet host entries.

Keys are per volume: the controller makes them with the volume and keeps them in a Kubernetes
Secret, hands them to the agent with each publish and kubelet hands them to the node plugin
(node-stage secrets). nvmet keeps a key on the `hosts/<hostnqn>/` group, which every subsystem
allowing that host shares, so a node reaches an authenticated volume under a host NQN of its own
for that volume (zvolt.names.volume_host_nqn). The agent persists the keys it was given under
`<state-dir>/dhchap/` (0700 folder, 0600 files, written atomically) so that a restart or reboot
restores them with the exports, and writes them into configfs before the host is linked.

Secret format (NVMe base spec, "DH-HMAC-CHAP secret representation"; what `nvme
gen-dhchap-key` prints and what the kernel parses): ``DHHC-1:<hh>:<base64(key || crc32(key)
little-endian)>:`` where hh names the hash used to transform the key (01 = SHA-256 with a
32-byte key, 02 = SHA-384 / 48, 03 = SHA-512 / 64).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Protocol

from zvolt import keyformat, names, tlspsk
from zvolt.errors import invalid
from zvolt.files import write_private_json

# hh -> key length in bytes (00 = untransformed key, any of the lengths; we never generate it).
KEY_LENGTHS = {1: 32, 2: 48, 3: 64}
# nvmet's dhchap_hash takes the HMAC name, not the transform id.
HASHES = {1: "hmac(sha256)", 2: "hmac(sha384)", 3: "hmac(sha512)"}
DHGROUPS = ("null", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192")
_SECRET = re.compile(r"^DHHC-1:(0[0-3]):([A-Za-z0-9+/]+={0,2}):$")


class SecretError(ValueError):
    pass


def encode_secret(key: bytes, transform: int = 1) -> str:
    if transform not in KEY_LENGTHS and transform != 0:
        raise SecretError(f"unknown key transform {transform}")
    if len(key) not in KEY_LENGTHS.values():
        raise SecretError(f"a DH-HMAC-CHAP key is 32, 48 or 64 bytes, not {len(key)}")
    if transform and len(key) != KEY_LENGTHS[transform]:
        raise SecretError(f"transform {transform:02d} needs a {KEY_LENGTHS[transform]}-byte key")
    return f"DHHC-1:{transform:02d}:{keyformat.wrap(key)}:"


def decode_secret(secret: str) -> tuple[int, bytes]:
    """(transform, key) of a DHHC-1 secret; SecretError if it is malformed or its CRC is wrong."""
    m = _SECRET.fullmatch(secret or "")
    if not m:
        raise SecretError("not a DHHC-1 secret")
    try:
        key = keyformat.unwrap(m.group(2), "DHHC-1 secret")
    except keyformat.KeyFormatError as exc:
        raise SecretError(str(exc)) from None
    if len(key) not in KEY_LENGTHS.values():
        raise SecretError(f"DHHC-1 key is {len(key)} bytes; expected 32, 48 or 64")
    transform = int(m.group(1))
    if transform and len(key) != KEY_LENGTHS[transform]:
        raise SecretError(f"DHHC-1 transform {transform:02d} needs a {KEY_LENGTHS[transform]}-byte key")
    return transform, key


def generate_secret(transform: int = 1) -> str:
    return encode_secret(secrets.token_bytes(KEY_LENGTHS[transform]), transform)


@dataclass(frozen=True)
class HostSecrets:
    host: str
    secret: str           # DH-HMAC-CHAP: the host proves itself with this one ("": no DH-HMAC-CHAP)
    ctrl_secret: str = ""  # bidirectional: the controller proves itself with this one
    tls_psk: str = ""      # NVMe/TCP TLS: the volume's configured PSK (zvolt/tlspsk.py; "": no TLS)

    def __repr__(self) -> str:  # never print keys by accident (logs, assertion messages)
        return (f"HostSecrets(host={self.host!r}, secret=<{'set' if self.secret else ''}>, "
                f"ctrl_secret=<{'set' if self.ctrl_secret else ''}>, tls_psk=<{'set' if self.tls_psk else ''}>)")


class HostAttrs(Protocol):
    """What the nvmet adapter's Host offers (agent.nvmet.Host)."""

    @property
    def nqn(self) -> str: ...

    def attr(self, name: str) -> str: ...
    def set_attr(self, name: str, value: str) -> None: ...


@dataclass(frozen=True)
class AuthConfig:
    bidirectional: bool = False
    transform: int = 1
    dhgroup: str = "null"

    def __post_init__(self) -> None:
        if self.transform not in KEY_LENGTHS:
            raise SecretError(f"hash transform must be one of {sorted(KEY_LENGTHS)}")
        if self.dhgroup not in DHGROUPS:
            raise SecretError(f"dhgroup must be one of {DHGROUPS}")


class HostKeys:
    """The DH-HMAC-CHAP keys of the hosts allowed on this node's authenticated exports, kept so
    that a restart or reboot restores them with the exports, and their application to configfs.

    Keys come from the caller (the controller reads them from the volume's Secret): each belongs
    to one host NQN, which is per volume (zvolt.names.volume_host_nqn), so a key opens one volume.
    """

    def __init__(self, state_dir: str, cfg: AuthConfig | None = None) -> None:
        self.cfg = cfg or AuthConfig()
        self.dir = os.path.join(state_dir, "dhchap")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._mu = threading.Lock()

    def _file(self, host: str) -> str:
        # NQNs may hold ':' and '.', never '/': safe as a file name once validated.
        return os.path.join(self.dir, names.check_nqn(host) + ".json")

    def load(self, host: str) -> HostSecrets | None:
        try:
            with open(self._file(host)) as f:
                data = json.load(f)
            found = HostSecrets(host, str(data["secret"]), str(data.get("ctrl_secret", "")),
                                str(data.get("tls_psk", "")))
            _check(found)
            return found
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, SecretError, tlspsk.PskError) as exc:
            # A damaged file must not silently lock the host out with an unknown key: say so.
            raise invalid(f"DH-HMAC-CHAP key file for {host} is damaged; publish the volume again to rewrite it: "
                          f"{exc}") from exc

    def put(self, found: HostSecrets) -> None:
        """Keep the host's keys (0600, atomic): written before the host entry is, so a crash
        between the two leaves a key that the next restore or publish applies."""
        with self._mu:
            if self.load(found.host) != found:
                write_private_json(self._file(found.host), {"secret": found.secret, "ctrl_secret": found.ctrl_secret,
                                                            "tls_psk": found.tls_psk})

    def forget(self, host: str) -> None:
        with self._mu, contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(host))

    def apply(self, host: HostAttrs, found: HostSecrets) -> None:
        """Write the keys (+ controller key, hash, group) into the host's nvmet entry; called
        before the host is linked into allowed_hosts, so it can never connect unauthenticated."""
        if not found.secret:
            return
        transform = decode_secret(found.secret)[0] or 1
        want = {
            "dhchap_hash": HASHES[transform],
            "dhchap_dhgroup": self.cfg.dhgroup,
            "dhchap_key": found.secret,
            "dhchap_ctrl_key": found.ctrl_secret,
        }
        for attr, value in want.items():
            if attr == "dhchap_ctrl_key" and not value and not host.attr(attr):
                continue
            if host.attr(attr) != value:
                host.set_attr(attr, value)


def _check(found: HostSecrets) -> None:
    if not found.secret and not found.tls_psk:
        raise SecretError("neither a DH-HMAC-CHAP key nor a TLS PSK")
    if found.secret:
        decode_secret(found.secret)
    elif found.ctrl_secret:
        raise SecretError("a DH-HMAC-CHAP controller key without a host key")
    if found.ctrl_secret:
        decode_secret(found.ctrl_secret)
    if found.tls_psk:
        tlspsk.decode(found.tls_psk)


def check_keys(key: str, ctrl_key: str, where: str, tls_psk: str = "") -> None:
    """Keys from outside (DH-HMAC-CHAP key and controller key, TLS PSK), checked (format and
    CRC); INVALID_ARGUMENT naming `where`, never repeating a key."""
    try:
        _check(HostSecrets("", key, ctrl_key, tls_psk))
    except SecretError as exc:
        raise invalid(f"{where} holds a DH-HMAC-CHAP key that is not a valid DHHC-1 secret: {exc}") from None
    except tlspsk.PskError as exc:
        raise invalid(f"{where} holds a TLS PSK that is not a valid NVMeTLSkey-1 key: {exc}") from None


def host_secrets(host: str, key: str, ctrl_key: str = "", tls_psk: str = "") -> HostSecrets:
    check_keys(key, ctrl_key, f"the publish request for {host}", tls_psk)
    return HostSecrets(host, key, ctrl_key, tls_psk)
