"""Run the tokeniser service: `python -m services.tokenizer [--port 50051] [--config llmp.yaml]`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from llmp.tokenizer.v1 import tokenizer_pb2_grpc as pb_grpc

from libs.common.artifacts import ArtifactStore
from libs.common.config import CommonConfig
from libs.common.rpc.server import Registration, Server
from libs.common.service import ServiceSpec, configure
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import TokenizerCore
from services.tokenizer.servicer import SERVICE_NAME, TokenizerServicer

SPEC = ServiceSpec(name="tokenizer", module="services.tokenizer", default_port=50051)


def build(common: CommonConfig, config: TokenizerConfig) -> tuple[Server, TokenizerCore]:
    core = TokenizerCore(config, ArtifactStore(common.artifacts_path))
    servicer = TokenizerServicer(core)
    registration = Registration(pb_grpc.add_TokenizerServiceServicer_to_server, servicer, SERVICE_NAME)
    return Server("tokenizer", config, [registration]), core


def main(argv: Sequence[str] | None = None) -> None:
    common, config = configure("tokenizer", TokenizerConfig, argv)
    server, core = build(common, config)
    asyncio.run(server.run(drain=core.drain))


if __name__ == "__main__":
    main()
