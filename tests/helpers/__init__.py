"""What the tests share, imported explicitly (`from tests.helpers.<module> import ...`).

Fixtures stay in the `conftest.py` of the folder that uses them; the classes and functions they
are built from live here, so no test imports another test module or a conftest:

- `services`: a service started as its own process (`python -m services.<name>`) on a free port;
- `redis_server`: a real redis-server with its own port and data directory;
- `tiny_models`: the one builder of tiny models (every supported architecture, and the byte-level
  Llama with its tokeniser that the service tests load) and prompts for them;
- `inference_core`: the inference core over the in-process backend, and the engine's reference answer;
- `training`: stand-ins for the tokeniser service and the model registry in submission checks;
- `training_stack`: Redis, the tokeniser service and the training service, for integration tests.
"""
