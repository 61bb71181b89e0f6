"""Run the inference service: `python -m services.inference [--port 50054] [--config llmp.yaml]`.

The process is the gRPC front (health, reflection, limits, drain) over Ray Serve handles: it
starts a local Ray with its dashboard on 127.0.0.1:8265 (or attaches to RAY_ADDRESS) and Serve,
and deploys each model LoadModel names as its own Serve application. `--set backend=local` serves
models in this process instead, without Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from llmp.inference.v1 import inference_pb2_grpc as pb_grpc

from libs.common.artifacts import ArtifactStore
from libs.common.config import CommonConfig
from libs.common.errors import InvalidArgument
from libs.common.rpc.server import Registration, Server
from libs.common.service import ServiceSpec, configure
from services.inference.config import InferenceConfig
from services.inference.core import Backend, InferenceCore, LocalBackend
from services.inference.engine import SamplingLimits
from services.inference.servicer import SERVICE_NAME, InferenceServicer

SPEC = ServiceSpec(name="inference", module="services.inference", default_port=50054, needs_ray=True)


def make_backend(config: InferenceConfig, store: ArtifactStore) -> Backend:
    limits = SamplingLimits(max_n=config.max_n, max_tokens=config.max_tokens)
    if config.backend == "local":
        return LocalBackend(store, limits)
    if config.backend == "ray":
        from services.inference.serve_app import ServeBackend  # Ray is only imported when used

        return ServeBackend(
            store,
            limits,
            ray_num_cpus=config.ray_num_cpus,
            dashboard=config.dashboard,
            dashboard_port=config.dashboard_port,
            messages_per_second=config.stream_messages_per_second,
        )
    raise InvalidArgument(f"{config.backend!r} is not 'ray' or 'local'", field="inference.backend")


def build(common: CommonConfig, config: InferenceConfig) -> tuple[Server, InferenceCore]:
    store = ArtifactStore(common.artifacts_path)
    core = InferenceCore(config, store, make_backend(config, store))
    registration = Registration(pb_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(core), SERVICE_NAME)
    return Server("inference", config, [registration]), core


def main(argv: Sequence[str] | None = None) -> None:
    common, config = configure("inference", InferenceConfig, argv)
    server, core = build(common, config)
    asyncio.run(server.run(load=core.start, drain=core.drain))


if __name__ == "__main__":
    main()
