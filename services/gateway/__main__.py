"""Run the gateway: `python -m services.gateway [--port 50050] [--set http_port=8000]`.

One process serves both sides on one event loop: gRPC (the server kit: health, reflection,
limits, drain) on LLMP_GATEWAY_PORT and HTTP (uvicorn) on LLMP_GATEWAY_HTTP_PORT, both on
127.0.0.1 unless LLMP_GATEWAY_HOST says otherwise. It needs Redis (LLMP_REDIS_URL) for keys and
quotas, and reaches the services at LLMP_<NAME>_ADDRESS. On first start it registers or makes
the first admin key (see keys.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import redis.asyncio
import uvicorn

from libs.common.artifacts import ArtifactStore
from libs.common.config import CommonConfig
from libs.common.errors import Unavailable
from libs.common.rpc.server import Server
from libs.common.service import ServiceSpec, configure
from services.gateway.app import Gateway, create_app
from services.gateway.backends import Backends
from services.gateway.config import GatewayConfig
from services.gateway.grpc_api import registrations
from services.gateway.keys import KeyStore
from services.gateway.model_text import ModelTexts
from services.gateway.quota import Quotas

SPEC = ServiceSpec(name="gateway", module="services.gateway", default_port=50050)
log = logging.getLogger(__name__)


def build(common: CommonConfig, config: GatewayConfig) -> Gateway:
    url = common.redis_url or f"redis://127.0.0.1:{common.redis_port}/0"
    client = redis.asyncio.Redis.from_url(url, decode_responses=True, health_check_interval=30)
    backends = Backends(max_message_bytes=config.max_message_bytes)
    return Gateway(
        config,
        KeyStore(client),
        Quotas(client, config.requests_per_minute, config.tokens_per_minute),
        backends,
        ModelTexts(backends, ArtifactStore(common.artifacts_path)),
    )


class HttpSide:
    """uvicorn on the running loop, without its own signal handling (the server kit owns SIGTERM)."""

    def __init__(self, gw: Gateway) -> None:
        config = uvicorn.Config(
            create_app(gw),
            host=gw.config.host,
            port=gw.config.http_port,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(gw.config.drain_seconds),
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server._serve())
        while not self.server.started:
            if self.task.done():
                raise Unavailable(f"cannot serve HTTP on {self.server.config.host}:{self.server.config.port}")
            await asyncio.sleep(0.02)
        log.info("gateway HTTP on http://%s:%d", self.server.config.host, self.server.config.port)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


async def serve(common: CommonConfig, config: GatewayConfig) -> None:
    """Build on the running loop (grpc.aio channels belong to it), serve until SIGTERM, drain."""
    gw = build(common, config)
    server = Server("gateway", config, registrations(gw))
    http = HttpSide(gw)

    async def load() -> None:
        await gw.keys.bootstrap(config.admin_key, common.home_path)
        await http.start()
        gw.serving = True

    async def drain() -> None:
        gw.serving = False
        await http.stop()
        await gw.backends.close()

    await server.run(load=load, drain=drain)


def main(argv: Sequence[str] | None = None) -> None:
    common, config = configure("gateway", GatewayConfig, argv)
    asyncio.run(serve(common, config))


if __name__ == "__main__":
    main()
