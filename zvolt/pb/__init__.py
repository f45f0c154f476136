"""Generated protobuf/gRPC stubs (see zvolt/pbgen.py; kept in sync by tests/unit/test_pbgen.py)."""
