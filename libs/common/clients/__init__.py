"""Typed clients of the llmp services over gRPC, for other services, the command line and tests."""
