"""The inference core over the in-process backend, as the service tests drive it, and the engine's own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from libs.common.artifacts import ArtifactStore
from services.inference.config import InferenceConfig
from services.inference.core import InferenceCore, LocalBackend
from services.inference.engine import LLMEngine, SamplingLimits, SamplingParams, load_model
from tests.helpers.tiny_models import TINY

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def make_core(store: ArtifactStore) -> InferenceCore:
    config = InferenceConfig(max_tokens=64, max_n=4, drain_seconds=5)
    return InferenceCore(config, store, LocalBackend(store, SamplingLimits(max_n=4, max_tokens=64)))


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def reference(store: ArtifactStore, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = LLMEngine(load_model(TINY, store))
    return engine.generate([prompt], params)[0].outputs[0].token_ids
