"""The node's own NVMe host identity (host NQN + host id), persisted in --state-dir.

Container and VM images often ship one /etc/nvme/hostnqn for every machine built from
them; two nodes with the same host NQN would be indistinguishable to the target's
allowed-hosts list. So the node plugin never adopts the OS identity: it generates its own
once, keeps it in the state dir, and passes it explicitly on every `nvme connect`.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from zvolt.errors import internal
from zvolt.files import write_private_json
from zvolt.names import HOST_NQN_PREFIX, check_nqn

_FILE = "host-identity.json"
_NAME_PART = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")


@dataclass(frozen=True)
class HostIdentity:
    hostnqn: str
    hostid: str


def _generate(node_name: str) -> HostIdentity:
    host_uuid = str(uuid.uuid4())
    # The node name inside the NQN is only for humans reading allowed_hosts; the uuid
    # makes it unique. Long names are left out to stay far below the 223-byte NQN limit.
    middle = f"{node_name}:" if _NAME_PART.fullmatch(node_name) else ""
    return HostIdentity(hostnqn=check_nqn(f"{HOST_NQN_PREFIX}:{middle}{host_uuid}"), hostid=host_uuid)


def _valid(data: object) -> HostIdentity | None:
    if not isinstance(data, dict):
        return None
    hostnqn, hostid = data.get("hostnqn"), data.get("hostid")
    if not isinstance(hostnqn, str) or not isinstance(hostid, str):
        return None
    try:
        check_nqn(hostnqn)
        uuid.UUID(hostid)
    except (ValueError, Exception):
        return None
    return HostIdentity(hostnqn=hostnqn, hostid=hostid)


def load_or_create(state_dir: str | os.PathLike[str], node_name: str) -> HostIdentity:
    """Return the persisted identity, creating it (atomically, mode 0600) the first time."""
    folder = Path(state_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / _FILE
    if path.exists():
        try:
            existing = _valid(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            existing = None
        if existing is not None:
            return existing
        # A corrupt file must not silently become a new identity while old connections
        # still use the previous one: keep it for inspection and fail loudly.
        raise internal(f"{path} is unreadable or invalid; inspect it, then remove it to generate a new identity")
    identity = _generate(node_name)
    write_private_json(path, {"hostnqn": identity.hostnqn, "hostid": identity.hostid})
    return identity
