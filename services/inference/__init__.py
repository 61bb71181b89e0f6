"""The inference service: model replicas with a paged KV cache, continuous batching and sampling."""
