"""Where the lab keeps its cache (images, modules, wheels, keys) and per-instance run dirs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


def source_root() -> Path:
    """The project tree shared into the guest at /src (the checkout this package lives in)."""
    env = os.environ.get("ZVOLT_LAB_SRC")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1]


def check_instance(name: str) -> str:
    if not _INSTANCE.fullmatch(name):
        raise ValueError(f"lab instance name {name!r} is not valid: use 1-32 of [A-Za-z0-9_.-]")
    return name


@dataclass(frozen=True)
class Cache:
    root: Path

    @classmethod
    def from_env(cls) -> Cache:
        env = os.environ.get("ZVOLT_LAB_CACHE")
        return cls(Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "zvolt-lab")

    @property
    def lock(self) -> Path:
        return self.root / "build.lock"

    @property
    def ssh_key(self) -> Path:
        return self.root / "keys" / "id_ed25519"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def current(self) -> Path:
        """Symlink to the image dir of the last successful build (what `up` boots)."""
        return self.images / "current"

    @property
    def modules(self) -> Path:
        return self.root / "modules"

    @property
    def wheels(self) -> Path:
        return self.root / "wheels"

    @property
    def debs(self) -> Path:
        return self.root / "debs"

    @property
    def apt(self) -> Path:
        return self.root / "apt"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def run_dir(self, instance: str) -> Path:
        return self.root / "runs" / check_instance(instance)


def instance_from_env() -> str:
    return check_instance(os.environ.get("ZVOLT_LAB_NAME", "default"))
