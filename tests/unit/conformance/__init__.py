"""CSI spec conformance suite (unit run: real gRPC servers, fakes behind the seams)."""
