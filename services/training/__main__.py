"""Run the training service: `python -m services.training [--port 50053] [--config llmp.yaml]`.

It needs Redis (LLMP_REDIS_URL, default the local one `llmp up` starts), the tokeniser service
(LLMP_TOKENIZER_ADDRESS) and Ray (RAY_ADDRESS, else a local Ray it starts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from llmp.training.v1 import training_pb2_grpc as pb_grpc

from libs.common.config import CommonConfig
from libs.common.rpc.server import Registration, Server
from libs.common.service import ServiceSpec, configure
from services.training.config import TrainingConfig
from services.training.core import TrainingCore
from services.training.servicer import SERVICE_NAME, TrainingServicer

SPEC = ServiceSpec(name="training", module="services.training", default_port=50053, needs_ray=True)


def build(common: CommonConfig, config: TrainingConfig) -> tuple[Server, TrainingCore]:
    core = TrainingCore.from_config(common, config)
    registration = Registration(pb_grpc.add_TrainingServiceServicer_to_server, TrainingServicer(core), SERVICE_NAME)
    return Server("training", config, [registration]), core


def main(argv: Sequence[str] | None = None) -> None:
    common, config = configure("training", TrainingConfig, argv)
    server, core = build(common, config)
    asyncio.run(server.run(load=lambda: asyncio.to_thread(core.load), drain=lambda: asyncio.to_thread(core.drain)))


if __name__ == "__main__":
    main()
