"""Shared fixtures. `lab`: the qemu guest with the real kernel stack, booted once per session."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

from lab import control as lab_control
from lab import hostpkgs as lab_hostpkgs
from lab.guest import Lab
from lab.paths import Cache, instance_from_env


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short folder in /tmp for unix sockets (108-byte path limit; pytest's tmp_path can be
    deeper), removed afterwards."""
    path = tempfile.mkdtemp(prefix="zvsock", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """Boots the lab guest (or reuses a running one) without starting services.

    Tests start what they need (lab.start_agent() ...). A guest this fixture booted is powered
    off at session end unless ZVOLT_LAB_KEEP=1; a guest that was already running is left up.
    Only a machine where qemu cannot run at all skips; a failed build or boot is an error.
    """
    ok, why = lab_hostpkgs.qemu_available()
    if not ok:
        pytest.skip(f"lab tests need qemu: {why}")
    cache = Cache.from_env()
    instance = instance_from_env()
    result = lab_control.up_result(cache, instance, lab_control.UpOptions(services=False), sys.stderr)
    yield result.lab
    # Decided under the instance lock: a guest someone else booted meanwhile is not ours to stop.
    if result.booted and os.environ.get("ZVOLT_LAB_KEEP") != "1":
        lab_control.down(cache, instance, sys.stderr)
