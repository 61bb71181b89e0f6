"""The seed document's memory and scaling figures, recomputed from the formulas of this package.

Each :class:`SeedCheck` holds one number the seed states, the value the formula gives and whether
they agree within the seed's own rounding; ``note`` explains any disagreement. ``llmp plan`` can
print these, and the tests pin them, so a change to a formula that breaks a known figure shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.planning.memory import FORMATS, GB, GIB, ModelShape, kv_cache_bytes, weight_bytes
from libs.common.planning.scaling import ChinchillaLaw, optimal_by_ratio, training_flops

# Published configs (config.json of each model).
LLAMA_2_7B = ModelShape(num_layers=32, hidden_size=4096, num_heads=32, vocab_size=32000, intermediate_size=11008)
LLAMA_3_8B = ModelShape(
    num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, vocab_size=128256, intermediate_size=14336
)
# Llama 3 70B, the seed's 70B example: 80 layers, 8 KV heads, head dimension 128 (8192 / 64).
LLAMA_70B = ModelShape(
    num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, vocab_size=128256, intermediate_size=28672
)


@dataclass(frozen=True)
class SeedCheck:
    """One figure of the seed against the formula."""

    item: str
    seed: float
    computed: float
    unit: str
    tolerance: float
    """Relative difference the seed's rounding allows ("~0.5 GB" allows more than "14 GB")."""
    note: str = ""

    @property
    def agrees(self) -> bool:
        return abs(self.computed - self.seed) <= self.tolerance * abs(self.seed)


def seed_checks() -> list[SeedCheck]:
    return [*_quantisation_checks(), *_kv_cache_checks(), *_scaling_checks()]


def _quantisation_checks() -> list[SeedCheck]:
    """The seed's table: a 7B model at BF16 14 GB, INT8 7 GB, INT4 3.5 GB, INT2 ~1.75 GB."""
    checks = []
    for name, seed_gb in (("bf16", 14.0), ("int8", 7.0), ("int4", 3.5), ("int2", 1.75)):
        fmt = FORMATS[name]
        flat = 7e9 * fmt.bits / 8 / GB
        checks.append(SeedCheck(f"7B weights, {name}, {fmt.bits} bits flat", seed_gb, flat, "GB", 0.01))
        if fmt.group_size:
            grouped = weight_bytes(7 * 10**9, fmt) / GB
            note = f"the table leaves out per-group scales: {fmt.bits_per_weight():.3f} bits per weight"
            item = f"7B weights, {name} with group-{fmt.group_size} scales"
            checks.append(SeedCheck(item, seed_gb, grouped, "GB", 0.01, note=note))
    llama2 = LLAMA_2_7B.param_count()
    real = weight_bytes(llama2, "bf16")
    note = f"a '7B' model has {llama2 / 1e9:.2f}B parameters: {real / GB:.2f} GB ({real / GIB:.2f} GiB)"
    checks.append(SeedCheck("Llama-2-7B weights, bf16", 14.0, real / GB, "GB", 0.01, note))
    return checks


def _kv_cache_checks() -> list[SeedCheck]:
    llama3 = kv_cache_bytes(LLAMA_3_8B, tokens=4096)
    llama3_all_heads = kv_cache_bytes(ModelShape(**{**vars(LLAMA_3_8B), "num_kv_heads": None}), tokens=4096)
    big = kv_cache_bytes(LLAMA_70B, tokens=4096)
    tokens_for_40gb = 40 * GB / (big / 4096)
    return [
        SeedCheck(
            "Llama-3-8B KV cache, bf16, 4K tokens",
            0.5,
            llama3 / GB,
            "GB",
            0.1,
            note=f"exactly {llama3 / GIB:g} GiB with its 8 KV heads; the seed's formula says num_heads, "
            f"and with all 32 heads it would be {llama3_all_heads / GIB:g} GiB",
        ),
        SeedCheck(
            "70B (80 layers, 8 KV heads, head dim 128) KV cache, bf16, 4K tokens",
            40.0,
            big / GB,
            "GB",
            0.1,
            note=f"the formula gives {big / GB:.2f} GB; ~40 GB is about {tokens_for_40gb / 1024:.0f}K tokens "
            "at this shape, or a batch of ~30 at 4K",
        ),
    ]


def _scaling_checks() -> list[SeedCheck]:
    gpt3 = training_flops(175e9, 300e9)
    by_rule = optimal_by_ratio(gpt3)
    by_law = ChinchillaLaw().optimal(gpt3)
    note = (
        f"C = 6 N D = {gpt3:.3g} FLOPs gives {by_rule.params / 1e9:.0f}B params on "
        f"{by_rule.tokens / 1e12:.2f}T tokens by the 20:1 rule ({by_law.params / 1e9:.0f}B on "
        f"{by_law.tokens / 1e12:.2f}T by the fitted law); 67B x 1.4T is "
        f"{training_flops(67e9, 1.4e12):.3g} FLOPs, about Chinchilla's own budget, not GPT-3's"
    )
    return [
        SeedCheck("compute-optimal params at GPT-3's budget", 67e9, by_rule.params, "params", 0.1, note),
        SeedCheck("compute-optimal tokens at GPT-3's budget", 1.4e12, by_rule.tokens, "tokens", 0.1, note),
        SeedCheck("tokens for a compute-optimal 175B model", 3.5e12, 20 * 175e9, "tokens", 0.01),
    ]
