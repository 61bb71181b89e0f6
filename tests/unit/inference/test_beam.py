"""Beam search against `transformers`' `generate(num_beams=k, do_sample=False)`, alone and in a busy batch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from libs.common.errors import InvalidArgument
from services.inference.engine import EngineConfig, KVCacheConfig, LLMEngine, SamplingParams, SchedulerConfig
from services.inference.engine.kv_cache import KVCache
from tests.helpers.tiny_models import prompt

torch.set_num_threads(1)

MAX_NEW = 8


def engine(models, arch: str, *, blocks: int = 64, **scheduler) -> LLMEngine:
    config = EngineConfig(KVCacheConfig(block_size=4, num_blocks=blocks), SchedulerConfig(**scheduler))
    return LLMEngine(models[arch], config)


def beams(width: int, n: int = 1, stop: int | None = None, **kwargs) -> SamplingParams:
    stop_ids = () if stop is None else (stop,)
    return SamplingParams(max_tokens=MAX_NEW, temperature=0, beam_width=width, n=n, stop_token_ids=stop_ids, **kwargs)


def reference(models, arch: str, tokens: list[int], params: SamplingParams) -> list[list[int]]:
    """transformers' n best beams, each cut after its stop token (the rest is padding)."""
    stop = params.stop_token_ids[0] if params.stop_token_ids else None
    with torch.no_grad():
        out = models[arch].module.generate(
            torch.tensor([tokens]),
            num_beams=params.beam_width,
            num_return_sequences=params.n,
            do_sample=False,
            max_new_tokens=params.max_tokens,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            eos_token_id=stop,
            pad_token_id=stop,
        )
    rows = out[:, len(tokens) :].tolist()
    return [row[: row.index(stop) + 1] if stop in row else row for row in rows]


def stop_token(models, arch: str, tokens: list[int]) -> int:
    """A token that some beam produces early, so that hypotheses end at different lengths."""
    return reference(models, arch, tokens, beams(4, n=2))[1][2]


def generated(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs.outputs]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("length_penalty", "early_stopping"), [(1.0, False), (2.0, "never"), (-1.0, True)])
def test_n_best_beams_equal_transformers(models, arch: str, length_penalty: float, early_stopping) -> None:
    tokens = prompt(7, seed=1)
    stop = stop_token(models, arch, tokens)
    params = beams(4, n=3, stop=stop, length_penalty=length_penalty, early_stopping=early_stopping)
    e = engine(models, arch)
    [out] = e.generate([tokens], params)
    assert generated(out) == reference(models, arch, tokens, params)
    assert {o.finish_reason for o in out.outputs} <= {"stop", "length"}
    assert e.cache.pool.num_used == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beams_run_in_a_batch_with_other_requests(models, arch: str) -> None:
    first, second, other = prompt(9, seed=2), prompt(5, seed=3), prompt(6, seed=4)
    wide = beams(3, n=3, stop=stop_token(models, arch, first))
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    e = engine(models, arch, max_num_batched_tokens=8)  # chunked prefill beside the beams' decodes
    ids = [e.add_request(other, greedy), e.add_request(first, wide)]
    shared = False
    for _ in range(3):
        e.step()
        tables = [e.cache.blocks(s.seq_id) for s in e.scheduler.running if s.request_id == ids[1]]
        shared |= len(tables) > 1 and len({b for t in tables for b in t}) < sum(map(len, tables))
    ids.append(e.add_request(second, beams(2)))
    done = {}
    while e.has_unfinished():
        done.update({out.request_id: out for out in e.step() if out.finished})
    assert shared, "the beams share their prompt's blocks"
    assert generated(done[ids[1]]) == reference(models, arch, first, wide)
    assert generated(done[ids[2]]) == reference(models, arch, second, beams(2))
    assert generated(done[ids[0]]) == generated(engine(models, arch).generate([other], greedy)[0])
    assert e.cache.pool.num_used == 0


def test_beams_without_room_in_the_batch_are_recomputed(models) -> None:
    tokens, older = prompt(10, seed=5), prompt(20, seed=8)
    params = beams(4, n=4, stop=stop_token(models, "llama", tokens))
    greedy = SamplingParams(max_tokens=24, temperature=0)
    e = engine(models, "llama", blocks=20, max_num_seqs=2)  # new beams wait in the queue, without a cache
    ids = [e.add_request(older, greedy), e.add_request(tokens, params)]
    done, queued_forks = {}, 0
    while e.has_unfinished():
        done.update({out.request_id: out for out in e.step() if out.finished})
        queued_forks += sum(s.request_id == ids[1] and s.num_computed == 0 for s in e.scheduler.waiting)
    assert queued_forks > 0
    assert generated(done[ids[1]]) == reference(models, "llama", tokens, params)
    assert generated(done[ids[0]]) == generated(engine(models, "llama").generate([older], greedy)[0])
    assert e.cache.pool.num_used == 0


def test_abort_ends_every_beam_and_frees_their_blocks(models) -> None:
    e = engine(models, "llama")
    rid = e.add_request(prompt(9, seed=6), beams(4, n=2))
    for _ in range(3):
        e.step()
    assert e.abort(rid)
    [out] = e.step()
    assert out.finished and [o.finish_reason for o in out.outputs] == ["abort", "abort"]
    assert not e.has_unfinished() and e.cache.pool.num_used == 0


def test_fork_shares_full_blocks_and_copies_the_partial_one(models) -> None:
    cache = KVCache(models["llama"].config, KVCacheConfig(block_size=4, num_blocks=8, prefix_caching=False))
    cache.allocate("a", 6)
    keys = torch.randn(2, 6, 2, 16)  # [layers, tokens, kv_heads, head_dim]
    for layer, k in zip(cache.key, keys, strict=True):
        layer[cache.slots("a", 0, 6)] = k
    assert cache.fork("a", "b", 6)
    assert cache.blocks("b")[0] == cache.blocks("a")[0] and cache.blocks("b")[1] != cache.blocks("a")[1]
    cache.free("a")
    assert cache.pool.num_used == 2  # the shared block and b's copy
    assert torch.equal(torch.stack([layer[cache.slots("b", 0, 6)] for layer in cache.key]), keys)
    cache.free("b")
    assert cache.pool.num_used == 0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"beam_width": 0}, "beam_width"),
        ({"beam_width": 17}, "beam_width"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"n": 5}, "n"),
        ({"temperature": 0.7}, "temperature"),
        ({"repetition_penalty": 1.2}, "beam_width"),
        ({"logprobs": 2}, "logprobs"),
        ({"max_tokens": 60}, "beam_width"),  # 4 beams of 65 tokens need 68 of the 64 blocks
    ],
)
def test_invalid_beam_values_are_refused_naming_the_field(models, changes: dict, field: str) -> None:
    e = engine(models, "llama")
    params = replace(beams(4), **changes)
    with pytest.raises(InvalidArgument) as info:
        e.add_request(prompt(5, seed=7), params)
    assert info.value.field == field
    assert not e.has_unfinished()
