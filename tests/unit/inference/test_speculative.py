"""Speculative decoding: same tokens as plain decoding at temperature 0, same distribution above it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from libs.common.errors import InvalidArgument
from services.inference.engine import (
    EngineConfig,
    KVCacheConfig,
    LLMEngine,
    SamplingParams,
    SchedulerConfig,
    speculative,
)
from services.inference.engine.drafters import DraftModelDrafter, NgramDrafter
from services.inference.engine.speculative import Drafter, create_drafter, rejection_sample
from tests.helpers.tiny_models import prompt

REPETITIVE = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8]
PROMPTS = [prompt(5, seed=1), prompt(17, seed=2), REPETITIVE, prompt(9, seed=3), prompt(30, seed=4)]


def engine(model, drafter: Drafter | None = None, *, blocks: int = 96, budget: int = 512) -> LLMEngine:
    scheduler = SchedulerConfig(max_num_batched_tokens=budget)
    return LLMEngine(model, EngineConfig(KVCacheConfig(block_size=4, num_blocks=blocks), scheduler), drafter=drafter)


def perturbed(model: PreTrainedModel, noise: float, seed: int) -> PreTrainedModel:
    """A copy of the model with Gaussian noise of `noise` times each weight's spread: a draft that agrees often."""
    copied = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copied.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std().nan_to_num(0))
    return copied


def make_drafter(target: PreTrainedModel, name: str) -> Drafter:
    kv = {"block_size": 4, "num_blocks": 96}
    if name == "ngram":
        return NgramDrafter(num_tokens=3)
    if name == "draft_model":
        return DraftModelDrafter(perturbed(target, 0.3, seed=7), num_tokens=3, kv_cache=kv)
    return DraftModelDrafter(target, num_tokens=4, kv_cache=kv)  # itself: accepts everything at temperature 0


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# -- temperature 0: token-identical -------------------------------------------------------------------
GREEDY = SamplingParams(max_tokens=20, temperature=0, logprobs=2)


@pytest.fixture(scope="module")
def plain(models) -> list:
    return engine(models["llama"].module).generate(PROMPTS, GREEDY)


@pytest.mark.parametrize("name", ["ngram", "draft_model", "self"])
def test_greedy_output_is_token_identical_to_plain_decoding(models, plain, name: str) -> None:
    target = models["llama"].module
    e = engine(target, make_drafter(target, name))
    spec = e.generate(PROMPTS, GREEDY)
    assert tokens(spec) == tokens(plain)
    for a, b in zip(spec, plain, strict=True):
        assert [t.logprob for t in a.outputs[0].logprobs] == pytest.approx([t.logprob for t in b.outputs[0].logprobs])
        assert 0 <= a.outputs[0].num_accepted_tokens <= a.outputs[0].num_draft_tokens
    drafted = sum(o.outputs[0].num_draft_tokens for o in spec)
    accepted = sum(o.outputs[0].num_accepted_tokens for o in spec)
    assert (e.speculator.num_drafted, e.speculator.num_accepted) == (drafted, accepted)  # type: ignore[union-attr]
    print(f"{name}: accepted {accepted} of {drafted} drafted ({accepted / max(drafted, 1):.0%})")
    assert drafted > 0
    if name == "self":
        assert accepted == drafted
    assert e.cache.pool.num_used == 0  # every block, drafted-into ones included, went back


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])  # absolute positions and Conv1D; a sliding window
def test_ngram_drafts_are_exact_on_other_architectures(models, arch: str) -> None:
    params = SamplingParams(max_tokens=16, temperature=0)
    assert tokens(engine(models[arch], NgramDrafter(3)).generate(PROMPTS, params)) == tokens(
        engine(models[arch]).generate(PROMPTS, params)
    )


def test_requests_joining_midway_with_chunked_prefill_and_stop_tokens(models, plain) -> None:
    target = models["llama"].module
    stop = tokens(plain)[1][6]  # cuts at least one output in the middle of what a draft covers
    params = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop,))
    expected = tokens(engine(target).generate(PROMPTS, params))
    e = engine(target, make_drafter(target, "self"), budget=8)  # prompts prefilled in chunks of <= 8 tokens
    ids = [e.add_request(p, params) for p in PROMPTS[:2]]
    done = {}
    for _ in range(3):
        done.update({o.request_id: o.outputs[0].token_ids for o in e.step()})
    ids += [e.add_request(p, params) for p in PROMPTS[2:]]
    while e.has_unfinished():
        done.update({o.request_id: o.outputs[0].token_ids for o in e.step()})
    assert [done[i] for i in ids] == expected
    assert any(t[-1] == stop and len(t) < 20 for t in expected)


def test_prefix_cache_after_speculation_holds_only_accepted_tokens(models, plain) -> None:
    """Blocks filled by verified drafts are registered; a later prompt reusing them gets the same output."""
    target = models["llama"].module
    params = SamplingParams(max_tokens=20, temperature=0)
    e = engine(target, make_drafter(target, "draft_model"))
    [first] = e.generate([PROMPTS[1]], params)
    assert tokens([first]) == tokens(plain)[1:2]
    extended = PROMPTS[1] + first.outputs[0].token_ids[:16]  # 33 tokens: 8 full blocks to reuse
    [second] = e.generate([extended], params)
    assert second.num_cached_tokens == 32  # 8 full blocks: prompt and verified drafts
    assert tokens([second]) == tokens(engine(target).generate([extended], params))


def test_cache_pressure_preempts_and_stays_exact(models, plain) -> None:
    target = models["llama"].module
    e = engine(target, make_drafter(target, "draft_model"), blocks=24)
    assert tokens(e.generate(PROMPTS, GREEDY)) == tokens(plain)
    assert e.scheduler.num_preemptions > 0


def test_ngram_lookup_proposes_what_followed_the_last_match() -> None:
    drafter = NgramDrafter(num_tokens=3, max_ngram=2)
    assert drafter.lookup([1, 2, 3, 4, 1, 2, 9, 1, 2], 3) == [9, 1, 2]  # the latest "1 2" wins
    assert drafter.lookup([1, 2, 3, 4, 5, 6], 3) == []
    assert drafter.lookup([4, 5, 4], 1) == [5]


def test_acceptance_on_a_repetitive_prompt(models) -> None:
    target = models["llama"].module
    e = engine(target, NgramDrafter(num_tokens=4))
    [out] = e.generate([REPETITIVE * 3], SamplingParams(max_tokens=24, temperature=0))
    completion = out.outputs[0]
    print(f"ngram on a repetitive prompt: {completion.num_accepted_tokens} of {completion.num_draft_tokens}")
    assert 0 < completion.num_accepted_tokens <= completion.num_draft_tokens


def test_drafter_specs_and_vocabulary_mismatch_are_refused(models) -> None:
    assert isinstance(create_drafter({"type": "ngram", "num_tokens": 2}), NgramDrafter)
    with pytest.raises(InvalidArgument, match=r"speculative\.type"):
        create_drafter({"type": "medusa"})
    with pytest.raises(InvalidArgument, match="artifact store"):
        create_drafter({"type": "draft_model", "model": "models/llama/1"})
    other = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_16))
    with pytest.raises(InvalidArgument, match="vocabulary"):
        engine(models["llama"], DraftModelDrafter(other, kv_cache={"num_blocks": 8}))


# -- temperature > 0: the distribution of the first two tokens ---------------------------------------------
TINY_16 = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=16, initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip
"""A 16-token model whose wide initialisation gives peaked, far from uniform next-token distributions."""
STAT_PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5]  # ends in a repeat: n-gram lookup drafts "9 2"
SAMPLES = 800
TEMPERATURE = 0.8


def tiny16(seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY_16)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def stat_models() -> tuple[PreTrainedModel, PreTrainedModel]:
    return tiny16(0), tiny16(3)  # the draft overlaps the target by ~25%: a wrong residual shows


def stat_drafter(name: str, other: PreTrainedModel) -> Drafter | None:
    if name == "ngram":
        return NgramDrafter(2, max_ngram=1)
    if name == "draft_model":
        return DraftModelDrafter(other, 2, {"block_size": 4, "num_blocks": 4096})
    return None


def exact_pairs(model: PreTrainedModel) -> torch.Tensor:
    """P(first two tokens = (a, b)) [16, 16] at TEMPERATURE, from two forward passes."""
    with torch.no_grad():
        first = (model(input_ids=torch.tensor([STAT_PROMPT])).logits[0, -1] / TEMPERATURE).softmax(-1)  # [16]
        grown = torch.tensor([[*STAT_PROMPT, a] for a in range(16)])  # [16, 10]: every first token
        second = (model(input_ids=grown).logits[:, -1] / TEMPERATURE).softmax(-1)  # [16, 16]
    return first[:, None] * second


def sample_pairs(target: PreTrainedModel, drafter: Drafter | None) -> torch.Tensor:
    """Counts [16, 16] of the first two tokens over SAMPLES requests with seeds 0..SAMPLES-1, all batched."""
    config = EngineConfig(
        KVCacheConfig(block_size=4, num_blocks=4096),
        SchedulerConfig(max_num_seqs=200, max_num_batched_tokens=1024, max_waiting=SAMPLES),
    )
    e = LLMEngine(target, config, drafter=drafter)
    for seed in range(SAMPLES):  # max_tokens 3 lets the first step draft two tokens
        e.add_request(STAT_PROMPT, SamplingParams(max_tokens=3, temperature=TEMPERATURE, seed=seed))
    counts = torch.zeros(16, 16)
    while e.has_unfinished():
        for out in e.step():
            if out.finished:
                a, b = out.outputs[0].token_ids[:2]
                counts[a, b] += 1
    return counts


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness of fit; cells expecting fewer than 5 draws are pooled into one."""
    expected = probs.flatten().double() * counts.sum()
    observed = counts.flatten().double()
    small = expected < 5
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(len(expected) - 1, dtype=torch.double)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))  # the chi-square survival function


# With 800 draws per test and deterministic seeds, a correct sampler passes a level of 1e-3 with
# probability 0.999 (and, the seeds being fixed, passes every run). The wrong rule below moves
# several percent of the mass between cells, which 800 draws see at p < 1e-6.
@pytest.mark.parametrize("name", ["plain", "draft_model", "ngram"])
def test_first_two_tokens_follow_the_target_distribution(stat_models, name: str) -> None:
    target, other = stat_models
    drafter = stat_drafter(name, other)
    p_value = chi_square_p_value(sample_pairs(target, drafter), exact_pairs(target))
    print(f"{name}: chi-square p-value {p_value:.3g}")
    assert p_value > 1e-3


def test_the_test_rejects_a_wrong_acceptance_rule(stat_models, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resampling from p instead of norm(max(0, p - q)) after a rejection over-weights p where q < p."""
    target, other = stat_models
    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    p_value = chi_square_p_value(sample_pairs(target, stat_drafter("draft_model", other)), exact_pairs(target))
    print(f"wrong residual: chi-square p-value {p_value:.3g}")
    assert p_value < 1e-6


def test_rejection_sampling_reproduces_p_exactly_in_expectation() -> None:
    """One position, exact arithmetic over many draws: the output frequencies converge to p, not q."""
    p = torch.tensor([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.1, 0.2, 0.7]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(2000):
        draft = int(torch.multinomial(q[0], 1, generator=g))
        accepted, token = rejection_sample(p, q, [draft], g)
        counts[draft if accepted else token] += 1
    assert (counts / counts.sum()).tolist() == pytest.approx(p[0].tolist(), abs=0.035)  # 3 sigma of 2000 draws
