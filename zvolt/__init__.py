"""Shared pieces of zvolt: names and ids, errors, RPC logging, generated gRPC stubs."""

__version__ = "0.1.0"
