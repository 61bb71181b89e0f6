"""The gateway: the one front door (API keys, quotas, OpenAI-compatible HTTP, platform API, gRPC)."""
