"""One request's failure is its own: a failing sampler, non-finite logits or a failing forward pass
fail that request alone, while the requests batched with it finish with the output they have alone."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from services.inference.engine import EngineConfig, KVCacheConfig, LLMEngine, SamplingParams
from services.inference.engine.batch import StepChunk
from services.inference.engine.engine import RequestFailed, RequestOutput, next_tick
from services.inference.engine.sampling import SAMPLERS, LogitsProcessor, SamplingContext
from tests.helpers.tiny_models import prompt

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, n=2, ignore_eos=True)
GOOD = [(prompt(6, seed=1), GREEDY), (prompt(11, seed=2), SAMPLED), (prompt(4, seed=3), GREEDY)]


class NanAfter(LogitsProcessor):
    """A broken third-party stage: logits turn NaN once `after` tokens are out."""

    def __init__(self, after: int) -> None:
        self.after = after

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        return logits * math.nan if len(ctx.output_ids) >= self.after else logits


@pytest.fixture
def nan_sampler() -> Iterator[None]:
    """NanAfter as the installed sampler plugin "nan_after" (what an entry point would resolve to)."""
    SAMPLERS._loaded["nan_after"] = NanAfter
    yield
    del SAMPLERS._loaded["nan_after"]


def engine(models) -> LLMEngine:
    return LLMEngine(models["llama"], EngineConfig(KVCacheConfig(block_size=4, num_blocks=64)))


def alone(models) -> list[list[list[int]]]:
    return [[o.token_ids for o in engine(models).generate([p], params)[0].outputs] for p, params in GOOD]


def run_all(e: LLMEngine) -> dict[str, RequestOutput]:
    last: dict[str, RequestOutput] = {}
    while e.has_unfinished():
        for out in e.step():
            last.setdefault(out.request_id, out)
            if last[out.request_id].error is None:  # the first failed output is what a stream raises
                last[out.request_id] = out
    return last


def check_good_and_bad(models, e: LLMEngine, bad: str) -> None:
    good = [e.add_request(p, params, request_id=f"good{i}") for i, (p, params) in enumerate(GOOD)]
    last = run_all(e)
    assert isinstance(last[bad].error, RequestFailed)
    assert [[o.token_ids for o in last[g].outputs] for g in good] == alone(models)
    assert all(last[g].error is None and last[g].finished for g in good)
    assert e.cache.usage == 0 and not e.scheduler.running and not e._requests  # nothing of the bad one is left
    # The engine goes on serving.
    [again] = e.generate([GOOD[0][0]], GREEDY)
    assert again.outputs[0].token_ids == alone(models)[0][0]


def test_a_failing_sampler_fails_only_its_request(models, nan_sampler: None) -> None:
    e = engine(models)
    e.add_request(
        prompt(8, seed=9),
        SamplingParams(max_tokens=10, processors=({"type": "nan_after", "after": 3},)),
        request_id="bad",
    )
    check_good_and_bad(models, e, "bad")


def faulty_forward(e: LLMEngine, fault: Callable[[list[StepChunk], torch.Tensor | None], torch.Tensor]) -> None:
    real = e.runner.forward

    def forward(chunks: list[StepChunk]) -> torch.Tensor:
        return fault(chunks, real(chunks))

    e.runner.forward = forward  # type: ignore[method-assign]


def test_non_finite_logits_fail_only_their_request(models) -> None:
    """A NaN row in the step's logits (as from an overflow in half precision) must not poison the batch."""
    e = engine(models)

    def nan_rows(chunks: list[StepChunk], logits: torch.Tensor | None) -> torch.Tensor:
        assert logits is not None
        row = 0
        for c in chunks:
            if c.sample:
                if c.seq_id.startswith("bad/"):
                    logits[row : row + c.num_logits] = math.nan
                row += c.num_logits
        return logits

    faulty_forward(e, nan_rows)
    e.add_request(prompt(8, seed=9), GREEDY, request_id="bad")
    check_good_and_bad(models, e, "bad")


def test_finite_logits_whose_sum_overflows_fail_no_request(models) -> None:
    """The step's finiteness check is one sum; finite rows that overflow it are checked again and pass."""
    e = engine(models)

    def huge(chunks: list[StepChunk], logits: torch.Tensor | None) -> torch.Tensor:
        assert logits is not None
        logits = logits.clone()
        logits[:, -2:] = -3.0e38  # finite, never the argmax; any row's sum overflows float32
        return logits

    faulty_forward(e, huge)
    good = [e.add_request(p, params, request_id=f"good{i}") for i, (p, params) in enumerate(GOOD)]
    last = run_all(e)
    assert all(last[g].error is None and last[g].finished for g in good)
    greedy = [i for i, (_, params) in enumerate(GOOD) if params is GREEDY]  # sampling saw two tokens fewer
    expected = alone(models)
    assert [[o.token_ids for o in last[good[i]].outputs] for i in greedy] == [expected[i] for i in greedy]


def test_a_failing_forward_pass_fails_only_its_request(models) -> None:
    e = engine(models)
    steps = 0

    def raise_for_bad(chunks: list[StepChunk], logits: torch.Tensor | None) -> torch.Tensor:
        nonlocal steps
        steps += 1
        if steps > 2 and any(c.seq_id.startswith("bad/") for c in chunks):
            raise RuntimeError("a kernel failed")
        assert logits is not None
        return logits

    faulty_forward(e, raise_for_bad)
    e.add_request(prompt(8, seed=9), GREEDY, request_id="bad")
    check_good_and_bad(models, e, "bad")


def test_a_step_that_fails_for_every_request_fails_the_engine(models) -> None:
    e = engine(models)

    def broken(chunks: list[StepChunk], logits: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError("the device is gone")

    faulty_forward(e, broken)
    for p, params in GOOD:
        e.add_request(p, params)
    with pytest.raises(RuntimeError, match="device is gone"):
        e.step()


def test_streams_beside_a_failing_one_finish(models, nan_sampler: None) -> None:
    e = engine(models)

    async def scenario() -> tuple[list[list[list[int]]], BaseException | None]:
        async def tokens(p: list[int], params: SamplingParams) -> list[list[int]]:
            outs = [out async for out in e.stream(p, params)]
            return [o.token_ids for o in outs[-1].outputs]

        bad = SamplingParams(max_tokens=10, processors=({"type": "nan_after", "after": 2},))
        results = await asyncio.gather(
            *(tokens(p, params) for p, params in GOOD), tokens(prompt(8, seed=9), bad), return_exceptions=True
        )
        return list(results[:-1]), results[-1]  # type: ignore[arg-type]

    good, error = asyncio.run(scenario())
    assert isinstance(error, RequestFailed)
    assert good == alone(models)


def test_a_stream_nobody_reads_holds_one_output(models) -> None:
    """Progress a reader has not taken is merged into one pending output, and nothing of it is lost."""
    e = engine(models)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def scenario() -> tuple[list[int], list[RequestOutput], int]:
        slow = e.stream(prompt(5, seed=4), params)
        first = await anext(slow)  # the request runs; its reader now stops reading
        outbox = next(iter(e._streams.values()))
        async for _ in e.stream(prompt(7, seed=5), params):  # drives the steps meanwhile
            pass
        pending = 1 if outbox._pending is not None else 0
        rest = [out async for out in slow]
        return first.outputs[0].new_token_ids, rest, pending

    first, rest, pending = asyncio.run(scenario())
    assert pending == 1
    assert len(rest) == 1 and rest[0].finished
    assert first + rest[0].outputs[0].new_token_ids == rest[0].outputs[0].token_ids
    assert rest[0].outputs[0].token_ids == engine(models).generate([prompt(5, seed=4)], params)[0].outputs[0].token_ids


def test_paced_and_final_only_streams_wake_their_reader_only_when_due(models) -> None:
    """A final-only stream yields once, finished; a paced one its first output and then nothing before
    the pace allows (here: the finished output), the tokens of the steps between merged, none lost."""
    e = engine(models)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = engine(models).generate([prompt(5, seed=4)], params)[0].outputs[0].token_ids

    async def scenario() -> tuple[list[RequestOutput], list[RequestOutput], list[RequestOutput]]:
        async def read(**pacing: object) -> list[RequestOutput]:
            return [out async for out in e.stream(prompt(5, seed=4), params, **pacing)]  # type: ignore[arg-type]

        every, final, paced = await asyncio.gather(read(), read(final_only=True), read(interval=lambda: 3600.0))
        return every, final, paced

    every, final, paced = asyncio.run(scenario())
    # at most one output a step, read as they come; the steps taken while the reader was away come merged
    assert len(every) <= 12 and [t for out in every for t in out.outputs[0].new_token_ids] == expected
    assert len(final) == 1 and final[0].finished and final[0].outputs[0].token_ids == expected
    assert len(paced) == 2 and paced[1].finished
    assert paced[0].outputs[0].new_token_ids + paced[1].outputs[0].new_token_ids == expected


def test_paced_streams_fall_due_together_at_one_output_an_interval() -> None:
    """A paced stream's next output waits for a tick of one clock: streams whose last outputs went out at
    different steps of the same interval fall due at the same tick, half to one and a half intervals on."""
    period = 0.08
    for now in [1000.0 + i * 0.0037 for i in range(200)]:
        tick = next_tick(now, period)
        assert now + period / 2 <= tick <= now + 1.5 * period + 1e-9
        assert abs(tick / period - round(tick / period)) < 1e-6
    # sent 3.5 ms apart (one engine step), inside one half-interval: both next go out at the same tick
    assert next_tick(1000.01, period) == next_tick(1000.0135, period)
    # over many outputs, one a period on average: 100 periods hold 100 ticks
    now, ticks = 0.0, 0
    while now < 100 * period:
        now, ticks = next_tick(now, period), ticks + 1
    assert 99 <= ticks <= 101
    assert next_tick(5.0, 0.0) == 5.0


def test_steps_go_on_while_the_streams_loop_is_busy(models) -> None:
    """The engine steps on its own thread: a reader whose loop is held up (here: blocked outright until
    the engine is done) finds the steps taken meanwhile merged into its next output, none lost."""
    e = engine(models)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = engine(models).generate([prompt(5, seed=4)], params)[0].outputs[0].token_ids

    async def scenario() -> list[RequestOutput]:
        stream = e.stream(prompt(5, seed=4), params)
        outs = [await anext(stream)]
        deadline = time.monotonic() + 60
        while e.has_unfinished() and time.monotonic() < deadline:  # the loop is never given back meanwhile
            time.sleep(0.001)
        assert not e.has_unfinished(), "the engine stood still while its streams' loop was busy"
        # the request ends inside a step; that step's output is handed to the loop just after
        assert e._stepper is not None
        e._stepper.wait_idle()
        outs += [out async for out in stream]
        return outs

    outs = asyncio.run(scenario())
    assert len(outs) == 2 and outs[1].finished
    assert outs[0].outputs[0].new_token_ids + outs[1].outputs[0].new_token_ids == expected


def test_a_stream_on_a_new_event_loop_is_served_while_an_old_loops_request_winds_down(models) -> None:
    """Requests left by a loop that has ended (closed early, their aborts pending) do not take the next
    loop's outputs with them: each output goes to the loop its stream runs on."""
    e = engine(models)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = engine(models).generate([prompt(6, seed=8)], params)[0].outputs[0].token_ids

    async def leave_early() -> None:
        stream = e.stream(prompt(5, seed=7), params)
        await anext(stream)
        await stream.aclose()  # aborted at the next step, which may run after this loop is gone

    async def read() -> list[int]:
        return [t async for out in e.stream(prompt(6, seed=8), params) for t in out.outputs[0].new_token_ids]

    for _ in range(5):
        asyncio.run(leave_early())
        assert asyncio.run(asyncio.wait_for(read(), 120)) == expected
