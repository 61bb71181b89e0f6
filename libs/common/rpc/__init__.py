"""The gRPC kit: one server builder, one interceptor, one way to make client channels."""
