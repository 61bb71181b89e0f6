from __future__ import annotations

import math

import pytest
import torch

from libs.common.errors import InvalidArgument
from services.inference.engine import (
    EngineConfig,
    KVCacheConfig,
    LLMEngine,
    SamplingLimits,
    SamplingParams,
    SchedulerConfig,
)
from services.inference.engine.sampling import (
    FrequencyPenalty,
    LogitBias,
    MinP,
    PresencePenalty,
    RepetitionPenalty,
    Sampler,
    SamplingContext,
    TopK,
    TopP,
)

CTX = SamplingContext(prompt_ids=[0], output_ids=[1, 1, 2])
INF = -math.inf


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 1.5),
        ("n", 0),
        ("n", 17),
        ("max_tokens", 0),
        ("max_tokens", 10_000),
        ("logprobs", 21),
        ("logit_bias", {256: 1.0}),
        ("stop_token_ids", (-1,)),
        ("stop", ("",)),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("seed", -1),
    ],
)
def test_invalid_values_name_their_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as raised:
        SamplingParams(**{field: value}).validate(vocab_size=256, limits=SamplingLimits())
    assert raised.value.field == field


def test_extra_processors_are_plugin_specs() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0])
    sampler = Sampler(SamplingParams(processors=({"type": "top_k", "k": 1},)), seed=0)
    assert {sampler.sample(logits, CTX)[0] for _ in range(20)} == {1}
    with pytest.raises(InvalidArgument, match="available"):
        Sampler(SamplingParams(processors=({"type": "no-such-sampler"},)), seed=0)
    with pytest.raises(InvalidArgument, match="does not take"):
        Sampler(SamplingParams(processors=({"type": "top_k", "kk": 1},)), seed=0)


def test_truncation_stages() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda stage: (stage(logits, CTX) > INF).tolist()  # noqa: E731
    assert kept(TopK(2)) == [True, True, False, False]
    assert kept(TopK(10)) == [True] * 4
    assert kept(TopP(0.8)) == [True, True, False, False]
    assert kept(TopP(0.81)) == [True, True, True, False]
    assert kept(TopP(0.1)) == [True, False, False, False]
    assert kept(MinP(0.3)) == [True, True, True, False]  # keeps p >= 0.15


def test_penalties_and_bias() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    assert RepetitionPenalty(2.0)(logits, CTX).tolist() == [1.0, -4.0, 0.5, 1.0]
    assert PresencePenalty(0.5)(logits, CTX).tolist() == [2.0, -2.5, 0.5, 1.0]
    assert FrequencyPenalty(0.5)(logits, CTX).tolist() == [2.0, -3.0, 0.5, 1.0]
    assert LogitBias({3: 5.0, 0: -1.0})(logits, CTX).tolist() == [1.0, -2.0, 1.0, 6.0]


def test_same_seed_same_draws_and_greedy_takes_the_first_best() -> None:
    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(), seed)
        return [sampler.sample(torch.zeros(50), CTX)[0] for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    tie = torch.tensor([0.0, 1.0, 1.0])
    assert Sampler(SamplingParams(temperature=0), 1).sample(tie, CTX)[0] == 1


def test_logprobs_are_the_models_own() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, 0.0])
    token, logprob = Sampler(SamplingParams(temperature=0, logprobs=2), 0).sample(logits, CTX)
    expected = logits.log_softmax(-1)
    assert token == 2 and logprob.token_id == 2
    assert logprob.logprob == pytest.approx(float(expected[2]))
    assert logprob.top == pytest.approx({2: float(expected[2]), 1: float(expected[1])})


def test_temperature_sampling_follows_the_softmax(models) -> None:
    """Draw 4000 first tokens through the engine; a chi-square statistic over bins bounds the error."""
    model = models["llama"].module
    draws, temperature = 4000, 0.8
    limits = SamplingLimits(max_n=draws)
    scheduler = SchedulerConfig(max_num_seqs=1024, max_num_batched_tokens=1024, max_waiting=draws)
    engine = LLMEngine(model, EngineConfig(KVCacheConfig(block_size=4, num_blocks=1100), scheduler, limits))
    prompt = [5, 9, 200]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    # The tiny random model is nearly uniform; a bias makes the distribution worth testing.
    bias = {t: float(b) for t, b in enumerate(torch.linspace(-4, 4, 256))}
    params = SamplingParams(max_tokens=1, temperature=temperature, logit_bias=bias, n=draws, seed=1234)
    [out] = engine.generate([prompt], params)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in out.outputs]), minlength=256).float()
    probs = ((logits + torch.tensor(list(bias.values()))) / temperature).softmax(-1)
    assert chi_square(counts, probs) < bound(counts, probs)
    wrong = (logits + torch.tensor(list(bias.values()))).softmax(-1)  # temperature 1 must be told apart
    assert chi_square(counts, wrong) > bound(counts, wrong)


def bins(counts: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens expected at least 5 times get a bin each; the rest share one."""
    expected = probs * counts.sum()
    big = expected >= 5
    return (torch.cat([counts[big], counts[~big].sum()[None]]), torch.cat([expected[big], expected[~big].sum()[None]]))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    observed, expected = bins(counts, probs)
    return float(((observed - expected) ** 2 / expected).sum())


def bound(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Mean plus five standard deviations of chi-square with k - 1 degrees of freedom."""
    dof = len(bins(counts, probs)[0]) - 1
    return dof + 5 * math.sqrt(2 * dof)
