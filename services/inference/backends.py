"""Where the inference service runs its models: a plugin of the `engines` kind (group `llmp.engines`).

An engine is a function `(config: InferenceConfig, store: ArtifactStore) -> Backend` (see
`core.Backend`), named by the service's `backend` setting. The built-ins: `ray`, a Ray Serve
deployment per model (`serve_app.ServeBackend`), and `local`, the models in this process without
Ray (`core.LocalBackend`). A third party adds one by installing a package with an entry point in
`llmp.engines`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from libs.common.artifacts import ArtifactStore
from libs.common.plugins import Registry
from services.inference.config import InferenceConfig
from services.inference.core import Backend, LocalBackend
from services.inference.engine import SamplingLimits

BackendBuilder = Callable[[InferenceConfig, ArtifactStore], Backend]

ENGINES: Registry[Any] = Registry(
    "engines",
    {"local": "services.inference.backends:local_backend", "ray": "services.inference.backends:ray_serve_backend"},
)


def limits(config: InferenceConfig) -> SamplingLimits:
    return SamplingLimits(max_n=config.max_n, max_tokens=config.max_tokens)


def local_backend(config: InferenceConfig, store: ArtifactStore) -> Backend:
    return LocalBackend(store, limits(config))


FRONT_ENV = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
"""Serve settings of the front's process. Its handles route on the gRPC server's event loop instead
of a router thread of their own, so a streamed chunk reaches its request without a hop between
threads (and the GIL handed over each time); every handle call here is made on that loop
(serve_app.ServeModel.stream). Serve reads them when first imported, so they are set before; a
local Ray's workers inherit them and hold no handles."""


def ray_serve_backend(config: InferenceConfig, store: ArtifactStore) -> Backend:
    for name, value in FRONT_ENV.items():
        os.environ.setdefault(name, value)
    from services.inference.serve_app import ServeBackend  # Ray is only imported when used

    return ServeBackend(
        store,
        limits(config),
        ray_num_cpus=config.ray_num_cpus,
        dashboard=config.dashboard,
        dashboard_port=config.dashboard_port,
        messages_per_second=config.stream_messages_per_second,
        cluster_serve=bool(config.managed_models.strip()),
        preload=config.cpu_preload,
        gather=config.gather_requests,
        engine_process=config.engine_process,
    )


def make_backend(config: InferenceConfig, store: ArtifactStore) -> Backend:
    """The backend the `backend` setting names; an unknown name is refused naming `inference.backend`."""
    build: BackendBuilder = ENGINES.get(config.backend, field="inference.backend")
    return build(config, store)
