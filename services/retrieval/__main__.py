"""Run the retrieval service: `python -m services.retrieval [--port 50052] [--config llmp.yaml]`.

Collections live in Qdrant Edge (Qdrant's engine in-process) under LLMP_HOME/qdrant_edge, or in
the Qdrant server that LLMP_QDRANT_URL names (LLMP_RETRIEVAL_VECTORSTORE=qdrant picks
qdrant-client's local mode under LLMP_HOME/qdrant instead of Qdrant Edge). Models and documents
are read from the artifact store. With a Ray (RAY_ADDRESS, or LLMP_RETRIEVAL_RAY=local), large
corpus ingests run on Ray Data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llmp.retrieval.v1 import retrieval_pb2_grpc as pb_grpc

from libs.common.artifacts import ArtifactStore
from libs.common.config import CommonConfig
from libs.common.rpc.server import Registration, Server
from libs.common.service import ServiceSpec, configure
from services.retrieval.config import RetrievalConfig
from services.retrieval.core import RetrievalCore
from services.retrieval.corpus import join_ray
from services.retrieval.servicer import SERVICE_NAME, RetrievalServicer
from services.retrieval.vectorstores import VECTORSTORES

SPEC = ServiceSpec(name="retrieval", module="services.retrieval", default_port=50052)


def store_spec(common: CommonConfig, config: RetrievalConfig) -> dict[str, Any]:
    """A Qdrant server when LLMP_QDRANT_URL is set, else the embedded store in a folder named after it."""
    if common.qdrant_url:
        return {"type": "qdrant", "url": common.qdrant_url}
    spec: dict[str, Any] = {"type": config.vectorstore, "path": str(common.home_path / config.vectorstore)}
    if config.vectorstore == "qdrant_edge":
        spec["index_threshold_kb"] = config.index_threshold_kb
    return spec


def build(common: CommonConfig, config: RetrievalConfig) -> tuple[Server, RetrievalCore]:
    store = VECTORSTORES.create(store_spec(common, config), field="vectorstore")
    core = RetrievalCore(config, ArtifactStore(common.artifacts_path), store)
    servicer = RetrievalServicer(core, join_ray(config))
    registration = Registration(pb_grpc.add_RetrievalServiceServicer_to_server, servicer, SERVICE_NAME)
    return Server("retrieval", config, [registration]), core


def main(argv: Sequence[str] | None = None) -> None:
    common, config = configure("retrieval", RetrievalConfig, argv)
    server, core = build(common, config)
    try:
        asyncio.run(server.run())
    finally:
        core.close()


if __name__ == "__main__":
    main()
