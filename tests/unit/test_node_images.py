"""What lab/node_images.py decides before buildah runs: which sidecars, under which names and
versions, which binaries can stand alone in an image FROM scratch, and the image config."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from lab.node_images import PAUSE_REFS, ScratchImage, binary_version, chart_sidecars, is_static_elf

REPO = Path(__file__).resolve().parents[2]


def elf(*program_headers: int, e_type: int = 2) -> bytes:
    """A minimal ELF64 little-endian header followed by program headers of these p_types."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", header, 0x10, e_type)
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, len(program_headers))
    return bytes(header) + b"".join(struct.pack("<I", p) + bytes(52) for p in program_headers)


def test_only_binaries_without_an_interpreter_count_as_static() -> None:
    assert is_static_elf(elf(1, 1, 4))  # PT_LOAD, PT_LOAD, PT_NOTE
    assert is_static_elf(elf(1, e_type=3))  # static-pie
    assert not is_static_elf(elf(6, 3, 1))  # PT_PHDR, PT_INTERP: needs ld.so and libc
    assert not is_static_elf(elf(1, e_type=1))  # relocatable object
    assert not is_static_elf(b"#!/bin/sh\n" + bytes(64))
    assert not is_static_elf(elf(1)[:-10])  # program headers cut off


def test_a_real_dynamic_binary_is_refused() -> None:
    assert not is_static_elf(Path("/bin/sh").resolve().read_bytes())


def test_sidecars_come_from_the_charts_values() -> None:
    values = yaml.safe_load((REPO / "charts/zvolt/values.yaml").read_text())["sidecars"]
    sidecars = chart_sidecars(REPO)
    assert {s.key for s in sidecars} == {k for k, v in values.items() if isinstance(v, dict) and "repository" in v}
    assert {s.binary for s in sidecars} >= {"csi-node-driver-registrar", "livenessprobe", "csi-provisioner",
                                            "csi-attacher", "csi-resizer", "csi-snapshotter"}
    for s in sidecars:
        assert s.repository.endswith("/" + s.binary) and s.chart_tag == values[s.key]["tag"]


def script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_version_is_what_the_binary_says(tmp_path: Path) -> None:
    binary = script(tmp_path / "csi-provisioner", 'echo "$0 v5.1.0"')
    (tmp_path / "VERSIONS.txt").write_text("csi-provisioner v9.9.9\n")
    assert binary_version(binary) == "v5.1.0"


def test_version_of_a_binary_without_version_flag_comes_from_the_listing(tmp_path: Path) -> None:
    binary = script(tmp_path / "livenessprobe", 'echo "unknown flag: $1" >&2; exit 2')
    (tmp_path / "VERSIONS.txt").write_text("# BINARY TAG\nlivenessprobe-x v1.0.0\nlivenessprobe  v2.15.0  5022ba7\n")
    assert binary_version(binary) == "v2.15.0"


def test_unknown_version_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    binary = script(tmp_path / "livenessprobe", "exit 2")
    with pytest.raises(ValueError, match=r"add a line 'livenessprobe vX\.Y\.Z'"):
        binary_version(binary)


def test_scratch_image_config_runs_the_binary_as_the_given_user(tmp_path: Path) -> None:
    args = ScratchImage(PAUSE_REFS, tmp_path / "pause", "65535:65535").config_args("r1")
    assert json.loads(args[args.index("--entrypoint") + 1]) == ["/pause"]
    assert args[args.index("--user") + 1] == "65535:65535"
    assert "io.zvolt.recipe=r1" in args
    assert "--user" not in ScratchImage(("localhost/x:1",), tmp_path / "x").config_args("r")
