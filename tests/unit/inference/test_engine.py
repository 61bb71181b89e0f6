from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import weakref

import pytest
import torch

from libs.common.errors import InvalidArgument, ResourceExhausted
from services.inference.engine import EngineConfig, KVCacheConfig, LLMEngine, SamplingParams, SchedulerConfig
from tests.helpers.tiny_models import CONFIGS, NEEDS_COMPILER, prompt

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def engine(models, arch: str = "llama", *, blocks: int = 64, budget: int = 512, **kwargs) -> LLMEngine:
    scheduler = SchedulerConfig(max_num_batched_tokens=budget, **kwargs)
    return LLMEngine(models[arch], EngineConfig(KVCacheConfig(block_size=4, num_blocks=blocks), scheduler))


def alone(models, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [engine(models).generate([p], params)[0].outputs[0].token_ids for p in prompts]


def run(e: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while e.has_unfinished():
        for out in e.step():
            tokens[out.request_id] = out.outputs[0].token_ids
    return tokens


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_greedy_equals_transformers_generate(models, arch: str) -> None:
    tokens = prompt(10, seed=2)
    with torch.no_grad():
        expected = models[arch].module.generate(torch.tensor([tokens]), max_new_tokens=12, do_sample=False)
    [out] = engine(models, arch).generate([tokens], GREEDY)
    assert out.outputs[0].token_ids == expected[0, 10:].tolist()
    assert out.outputs[0].finish_reason == "length"


def test_requests_together_and_joining_midway_equal_each_alone(models) -> None:
    prompts = [prompt(n, seed=n) for n in (5, 17, 9, 30)]
    e = engine(models)
    ids = [e.add_request(p, GREEDY) for p in prompts[:2]]
    for _ in range(4):
        e.step()
    ids += [e.add_request(p, GREEDY) for p in prompts[2:]]
    tokens = run(e)
    assert [tokens[i] for i in ids] == alone(models, prompts)


def test_chunked_prefill_gives_the_same_output_without_stalling_decodes(models) -> None:
    short, long = prompt(4, seed=3), prompt(40, seed=4)
    e = engine(models, budget=8)
    first = e.add_request(short, GREEDY)
    e.step()
    second = e.add_request(long, GREEDY)
    progress = []
    for _ in range(5):  # the 40-token prompt needs 5 steps of at most 7 tokens besides one decode
        outputs = {o.request_id: o for o in e.step()}
        progress.append(len(outputs[first].outputs[0].new_token_ids))
        assert second not in outputs  # still prefilling
    assert progress == [1] * 5
    tokens = run(e)
    assert [tokens[first], tokens[second]] == alone(models, [short, long])


def test_prefix_cache_hit_reuses_blocks_and_changes_nothing(models) -> None:
    shared = prompt(18, seed=5)
    a, b = [*shared, 1, 2, 3], [*shared, 7]
    e = engine(models)
    [first] = e.generate([a], GREEDY)
    used_by_first = e.cache.pool.num_blocks - e.cache.pool.num_available
    [second] = e.generate([b], GREEDY)
    assert first.num_cached_tokens == 0 and used_by_first == 0
    assert second.num_cached_tokens == 16  # four full blocks of the shared prefix
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == alone(models, [a, b])


def test_abort_frees_the_slot_and_blocks_at_the_next_step(models) -> None:
    e = engine(models)
    doomed = e.add_request(prompt(20, seed=6), SamplingParams(max_tokens=50))
    kept = e.add_request(prompt(6, seed=7), GREEDY)
    e.step()
    e.step()
    used = e.cache.usage
    assert e.abort(doomed)
    assert not e.abort("no-such-request")
    outputs = {o.request_id: o for o in e.step()}
    assert outputs[doomed].finished and outputs[doomed].outputs[0].finish_reason == "abort"
    assert e.cache.usage < used and len(e.scheduler.running) == 1
    assert run(e)[kept] == alone(models, [prompt(6, seed=7)])[0]
    assert e.cache.usage == 0


def test_a_full_queue_refuses_requests(models) -> None:
    e = engine(models, max_waiting=2)
    e.add_request([1, 2], GREEDY)
    with pytest.raises(ResourceExhausted):
        e.add_request([3], SamplingParams(n=2))
    e.add_request([3], GREEDY)
    with pytest.raises(ResourceExhausted):
        e.add_request([4], GREEDY)


def test_a_small_cache_preempts_and_recomputes_without_changing_outputs(models) -> None:
    prompts = [prompt(10, seed=s) for s in range(4)]
    e = engine(models, blocks=12)  # four sequences of 22 tokens need 24 blocks
    ids = [e.add_request(p, GREEDY) for p in prompts]
    tokens = run(e)
    assert e.scheduler.num_preemptions > 0
    assert [tokens[i] for i in ids] == alone(models, prompts)


def test_seeded_sampling_is_reproducible_in_any_batch(models) -> None:
    tokens = prompt(8, seed=8)
    seeded = SamplingParams(max_tokens=10, seed=42, top_k=50, n=2)
    [by_itself] = engine(models).generate([tokens], seeded)
    e = engine(models)
    e.add_request(prompt(13, seed=9), SamplingParams(max_tokens=20))
    e.step()
    rid = e.add_request(tokens, seeded)
    final = {}
    while e.has_unfinished():
        final.update({o.request_id: o for o in e.step()})
    samples = [o.token_ids for o in final[rid].outputs]
    assert samples == [o.token_ids for o in by_itself.outputs]
    assert samples[0] != samples[1]  # sample i uses seed + i


def test_stop_tokens_stop_strings_and_eos(models) -> None:
    tokens = prompt(6, seed=10)
    [free] = engine(models).generate([tokens], GREEDY)
    generated = free.outputs[0].token_ids
    [out] = engine(models).generate(
        [tokens], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(generated[3],))
    )
    assert out.outputs[0].token_ids == generated[: generated.index(generated[3]) + 1]
    assert out.outputs[0].finish_reason == "stop"

    text = lambda ids: "".join(f"<{t}>" for t in ids)  # noqa: E731
    e = LLMEngine(models["llama"], EngineConfig(KVCacheConfig(block_size=4, num_blocks=64)), detokenize=text)
    [out] = e.generate([tokens], SamplingParams(max_tokens=12, temperature=0, stop=(f"<{generated[2]}>",)))
    assert out.outputs[0].text == text(generated[: generated.index(generated[2])])
    assert out.outputs[0].finish_reason == "stop"

    e = engine(models)
    e.eos_token_ids = {generated[1]}
    [out] = e.generate([tokens], GREEDY)
    assert out.outputs[0].token_ids == generated[: generated.index(generated[1]) + 1]
    [out] = e.generate([tokens], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out.outputs[0].token_ids == generated


def test_text_is_decoded_for_the_outputs_read_and_at_every_token_only_for_stop_strings(models) -> None:
    # Each decode is of the whole completion so far: at every token it would cost the square of its length.
    decoded: list[int] = []

    def text(ids: list[int]) -> str:
        decoded.append(len(ids))
        return "".join(f"<{t}>" for t in ids)

    e = LLMEngine(models["llama"], EngineConfig(KVCacheConfig(block_size=4, num_blocks=64)), detokenize=text)
    tokens, params = prompt(6, seed=10), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    [out] = e.generate([tokens], params)
    assert decoded == [30]
    expected = "".join(f"<{t}>" for t in out.outputs[0].token_ids)
    assert out.outputs[0].text == expected

    async def final_only() -> list:
        return [o async for o in e.stream(tokens, params, final_only=True)]

    decoded.clear()
    [last] = asyncio.run(final_only())
    assert decoded == [30] and last.outputs[0].text == expected

    decoded.clear()  # generate() waits for the stream's step thread, which may not have ended yet
    [stopped] = e.generate([tokens], dataclasses.replace(params, stop=("<none>",)))
    assert decoded == list(range(1, 31))  # a stop string may end at any token
    assert stopped.outputs[0].text == expected


def test_streams_are_stepped_by_one_thread_that_parks_between_bursts_and_ends_with_its_engine(models) -> None:
    """A thread per burst of streams would leave an OpenMP worker behind each time it ended (Intel's
    OpenMP): every burst must be stepped by the same thread, which must not keep its engine alive."""
    steppers: set[threading.Thread] = set()

    def text(ids: list[int]) -> str:  # called on the thread that steps the streams
        steppers.add(threading.current_thread())
        return ""

    e = LLMEngine(models["llama"], EngineConfig(KVCacheConfig(block_size=4, num_blocks=64)), detokenize=text)

    async def drain(stream) -> list:
        return [o async for o in stream]

    async def burst(engine: LLMEngine) -> None:
        outputs = await asyncio.gather(*(drain(engine.stream(prompt(5, seed=s), GREEDY)) for s in range(3)))
        assert all(out[-1].finished for out in outputs)

    for _ in range(4):
        asyncio.run(burst(e))
        e.generate([prompt(3, seed=9)], GREEDY)  # waits for the thread to park, then steps here
    (stepper,) = steppers - {threading.current_thread()}
    assert stepper.is_alive() and stepper.name == "llmp-engine"
    engine_ref = weakref.ref(e)
    del e
    gc.collect()
    assert engine_ref() is None, "the step thread keeps its engine alive"
    stepper.join(timeout=60)
    assert not stepper.is_alive()


def test_step_and_generate_are_refused_while_a_stream_is_open_and_run_once_it_closed(models) -> None:
    e, other = engine(models), prompt(4, seed=2)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def main() -> list[int]:
        stream = e.stream(prompt(5, seed=1), params)
        await anext(stream)  # the stream's thread steps the engine now
        for drive in (e.step, lambda: e.generate([other], GREEDY)):
            with pytest.raises(RuntimeError, match="while a stream is open"):
                drive()
        await stream.aclose()  # its request is aborted by the thread, which then ends
        [out] = e.generate([other], GREEDY)
        return out.outputs[0].token_ids

    assert asyncio.run(main()) == alone(models, [other])[0]
    assert not e.has_unfinished() and e.cache.usage == 0


def test_logprobs_and_n_greedy(models) -> None:
    [out] = engine(models).generate([prompt(5, seed=11)], SamplingParams(max_tokens=3, temperature=0, n=2, logprobs=3))
    first, second = out.outputs
    assert first.token_ids == second.token_ids
    assert [lp.token_id for lp in first.logprobs] == first.token_ids
    assert all(len(lp.top) == 3 and lp.logprob == max(lp.top.values()) for lp in first.logprobs)


@pytest.mark.parametrize(
    ("prompt_ids", "params", "field"),
    [
        ([], GREEDY, "prompt"),
        ([256], GREEDY, "prompt"),
        (list(range(200)) * 2, GREEDY, "prompt"),
        ([1] * 250, SamplingParams(max_tokens=10), "max_tokens"),
        ([1], SamplingParams(stop=("x",)), "stop"),
        ([1], SamplingParams(top_p=0), "top_p"),
    ],
)
def test_bad_requests_are_refused_before_any_work(models, prompt_ids, params, field) -> None:
    e = engine(models, blocks=64)  # the context: 256 positions, also what 64 blocks of 4 hold
    with pytest.raises(InvalidArgument) as raised:
        e.add_request(prompt_ids, params)
    assert raised.value.field == field
    assert not e.has_unfinished()


def test_streaming_yields_tokens_as_they_come_and_closing_aborts(models) -> None:
    tokens = prompt(7, seed=12)
    params = dataclasses.replace(GREEDY, max_tokens=40)
    e = engine(models)

    async def collect() -> list[list[int]]:
        return [o.outputs[0].new_token_ids async for o in e.stream(tokens, params)]

    async def give_up() -> None:
        stream = e.stream(prompt(7, seed=13), SamplingParams(max_tokens=50))
        await anext(stream)
        await stream.aclose()
        while e.has_unfinished():
            await asyncio.sleep(0.01)

    pieces = asyncio.run(collect())
    # Steps run on while the reader is away; what it missed comes merged in its next piece.
    assert len(pieces) > 1 and all(pieces)
    assert [t for p in pieces for t in p] == alone(models, [tokens], params)[0]
    asyncio.run(give_up())
    assert e.cache.usage == 0


@NEEDS_COMPILER
def test_compiled_decode_is_warmed_up_at_load_and_gives_the_same_tokens(models) -> None:
    from torch._dynamo.utils import counters

    config = EngineConfig(KVCacheConfig(block_size=4, num_blocks=64), SchedulerConfig(), compile=True)
    e = LLMEngine(models["llama"], config)
    assert e.warm_up() > 0 and not e.has_unfinished()
    graphs = counters["stats"]["unique_graphs"]
    prompts = [prompt(n, seed=n) for n in (3, 9, 17)]
    ids = [e.add_request(p, GREEDY) for p in prompts[:2]]
    e.step()
    ids.append(e.add_request(prompts[2], GREEDY))  # joins while the others decode
    tokens = run(e)
    assert [tokens[i] for i in ids] == alone(models, prompts)
    assert e.runner.compiled is not None, "the compiled graph failed and the engine fell back to eager"
    assert counters["stats"]["unique_graphs"] == graphs  # warm-up compiled every graph the requests needed
