"""Run the inference service: `python -m services.inference [--port 50054] [--config llmp.yaml]`.

The process is the gRPC front (health, reflection, limits, drain) over Ray Serve handles: it
starts a local Ray with its dashboard on 127.0.0.1:8265 (or attaches to RAY_ADDRESS) and Serve,
and deploys each model LoadModel names as its own Serve application. `--set backend=local` serves
models in this process instead, without Ray (backends are `llmp.engines` plugins: see backends.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from llmp.inference.v1 import inference_pb2_grpc as pb_grpc

from libs.common.artifacts import ArtifactStore
from libs.common.config import CommonConfig
from libs.common.rpc.server import Registration, Server
from libs.common.service import ServiceSpec, configure
from services.inference.backends import make_backend
from services.inference.config import InferenceConfig
from services.inference.core import InferenceCore
from services.inference.runtime import reexec_with_preloads
from services.inference.servicer import SERVICE_NAME, InferenceServicer

SPEC = ServiceSpec(name="inference", module="services.inference", default_port=50054, needs_ray=True)


def build(common: CommonConfig, config: InferenceConfig) -> tuple[Server, InferenceCore]:
    store = ArtifactStore(common.artifacts_path)
    core = InferenceCore(config, store, make_backend(config, store))
    registration = Registration(pb_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(core), SERVICE_NAME)
    return Server("inference", config, [registration]), core


def main(argv: Sequence[str] | None = None) -> None:
    common, config = configure("inference", InferenceConfig, argv)
    if argv is None and config.cpu_preload and config.backend == "local":  # engines here (replicas: serve_app)
        reexec_with_preloads()
    server, core = build(common, config)
    asyncio.run(server.run(load=core.start, drain=core.drain))


if __name__ == "__main__":
    main()
