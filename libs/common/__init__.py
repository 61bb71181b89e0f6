"""Shared kit of every llmp service: config, logging, errors, plugins, artifact store, gRPC server and clients."""
