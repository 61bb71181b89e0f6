"""The retrieval service: embeddings, chunking, Qdrant collections, hybrid search, RAG context."""
