"""The inference engine, usable in-process: load a model, add requests, step, read outputs.

Public API: `load_model`, `LLMEngine` with `EngineConfig`, `SamplingParams`, and the output types;
quantisers (`QUANTIZERS`, `save_quantized`) and drafters for speculative decoding (`create_drafter`).
"""

from services.inference.engine.decoding import CompletionOutput
from services.inference.engine.engine import EngineConfig, LLMEngine, RequestOutput
from services.inference.engine.kv_cache import KVCacheConfig
from services.inference.engine.model_loader import LoadedModel, load_model
from services.inference.engine.quantization import QUANTIZERS, QuantizationReport, save_quantized
from services.inference.engine.sampling import SAMPLERS, SamplingLimits, SamplingParams, TokenLogprob
from services.inference.engine.scheduler import SchedulerConfig
from services.inference.engine.speculative import DRAFTERS, Drafter, create_drafter

__all__ = [
    "DRAFTERS",
    "QUANTIZERS",
    "SAMPLERS",
    "CompletionOutput",
    "Drafter",
    "EngineConfig",
    "KVCacheConfig",
    "LLMEngine",
    "LoadedModel",
    "QuantizationReport",
    "RequestOutput",
    "SamplingLimits",
    "SamplingParams",
    "SchedulerConfig",
    "TokenLogprob",
    "create_drafter",
    "load_model",
    "save_quantized",
]
