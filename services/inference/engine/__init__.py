"""The inference engine, usable in-process: load a model, add requests, step, read outputs.

Public API: `load_model`, `LLMEngine` with `EngineConfig`, `SamplingParams`, and the output types.
"""

from services.inference.engine.engine import CompletionOutput, EngineConfig, LLMEngine, RequestOutput
from services.inference.engine.kv_cache import KVCacheConfig
from services.inference.engine.model_loader import LoadedModel, load_model
from services.inference.engine.sampling import SAMPLERS, SamplingLimits, SamplingParams, TokenLogprob
from services.inference.engine.scheduler import SchedulerConfig

__all__ = [
    "SAMPLERS",
    "CompletionOutput",
    "EngineConfig",
    "KVCacheConfig",
    "LLMEngine",
    "LoadedModel",
    "RequestOutput",
    "SamplingLimits",
    "SamplingParams",
    "SchedulerConfig",
    "TokenLogprob",
    "load_model",
]
