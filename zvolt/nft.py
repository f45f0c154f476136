"""The one adapter that runs `nft`: a ruleset on stdin (`nft -f -`), a table listed as JSON.

argv is always a list; table family and name are checked against allow-lists before they are
used, and the ruleset text comes only from zvolt/nftguard.py, which builds it from validated
values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from zvolt.commands import Result, Runner, subprocess_runner

FAMILIES = frozenset({"inet", "ip", "ip6"})
_TABLE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MISSING = "No such file or directory"


class NftError(RuntimeError):
    pass


def _first_line(res: Result) -> str:
    # nft names the problem on its first line ("Error: ..."), then quotes the input.
    lines = (res.stderr or res.stdout).strip().splitlines()
    return lines[0] if lines else "no output"


def check_table(family: str, table: str) -> tuple[str, str]:
    if family not in FAMILIES:
        raise NftError(f"nftables family {family!r} is not one of {sorted(FAMILIES)}")
    if not _TABLE.fullmatch(table):
        raise NftError(f"nftables table name {table!r} is not [a-z][a-z0-9_]{{0,31}}")
    return family, table


@dataclass(frozen=True)
class Nft:
    runner: Runner = field(default=subprocess_runner)
    binary: str = "nft"
    timeout: float = 30.0

    def apply(self, script: str) -> None:
        """One transaction: nft applies all of it or none of it."""
        if "\0" in script:
            raise NftError("ruleset text contains NUL")
        res = self.runner([self.binary, "-f", "-"], stdin=script, timeout=self.timeout)
        if res.returncode != 0:
            raise NftError(f"nft -f - failed (exit {res.returncode}): {_first_line(res)}")

    def list_table(self, family: str, table: str) -> dict[str, Any] | None:
        """The table as `nft -j` prints it, or None when it does not exist."""
        family, table = check_table(family, table)
        res = self.runner([self.binary, "-j", "list", "table", family, table], timeout=self.timeout)
        if res.returncode != 0:
            if _MISSING in res.stderr:
                return None
            raise NftError(f"nft list table {family} {table} failed (exit {res.returncode}): {_first_line(res)}")
        try:
            listing = json.loads(res.stdout)
        except json.JSONDecodeError as exc:
            raise NftError(f"nft -j printed something that is not JSON: {exc}") from None
        if not isinstance(listing, dict) or not isinstance(listing.get("nftables"), list):
            raise NftError("nft -j printed JSON without an 'nftables' list")
        return listing
