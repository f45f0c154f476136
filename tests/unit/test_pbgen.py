"""The committed stubs in zvolt/pb must be exactly what the pinned grpcio-tools makes of proto/."""

from pathlib import Path

from zvolt import pbgen


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    written = pbgen.generate(tmp_path)
    assert written, "no protos were generated"
    for fresh in written:
        committed = pbgen.ROOT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python -m zvolt.pbgen"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run python -m zvolt.pbgen"
