"""Closed-form planners: memory (weights, KV cache, training) and scaling laws (compute-optimal N and D).

Pure functions with no I/O, used by the training service to refuse jobs that cannot fit and by
``llmp plan`` to print budgets.
"""

from libs.common.planning.memory import (
    FORMATS,
    GB,
    GIB,
    ModelShape,
    TrainingMemory,
    WeightFormat,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    training_memory,
    weight_bytes,
    weight_format,
)
from libs.common.planning.scaling import (
    Allocation,
    ChinchillaLaw,
    PowerLawFit,
    fit_power_law,
    optimal_by_ratio,
    training_flops,
)
from libs.common.planning.seed_check import SeedCheck, seed_checks

__all__ = [
    "FORMATS",
    "GB",
    "GIB",
    "Allocation",
    "ChinchillaLaw",
    "ModelShape",
    "PowerLawFit",
    "SeedCheck",
    "TrainingMemory",
    "WeightFormat",
    "fit_power_law",
    "kv_cache_bytes",
    "kv_cache_bytes_per_token",
    "optimal_by_ratio",
    "seed_checks",
    "training_flops",
    "training_memory",
    "weight_bytes",
    "weight_format",
]
