"""Generate the Python gRPC stubs from proto/ into zvolt/pb (run: python -m zvolt.pbgen).

The stubs are committed so that installs need no grpcio-tools; a unit test regenerates
them into a temporary folder and fails when they differ from the committed ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("agent.proto", "csi.proto")


def generate(out_dir: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # dev dependency only

    include = Path(grpc_tools.__file__).parent / "_proto"
    written: list[Path] = []
    for proto in PROTOS:
        src = ROOT / "proto" / proto
        if not src.exists():
            continue
        # The virtual import path zvolt/pb makes the generated modules import each other
        # as "from zvolt.pb import ..." instead of a bare top-level name.
        args = [
            "protoc",
            f"-Izvolt/pb={ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"zvolt/pb/{proto}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto}")
        stem = proto.removesuffix(".proto")
        written += [out_dir / "zvolt" / "pb" / f"{stem}{s}" for s in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


def main() -> int:
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
