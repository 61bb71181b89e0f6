"""Sliding-window attention as a load option: the engine's output equals attention under an explicit
windowed mask, the KV blocks a long generation holds stay bounded, and a bad window is refused."""

from __future__ import annotations

import pytest
import torch
from llmp.inference.v1 import inference_pb2 as pb

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from services.inference.engine import EngineConfig, KVCacheConfig, LLMEngine, SamplingParams, load_model
from services.inference.schema import EngineOptions, GenerateInput, ModelSpec
from services.inference.servicer import model_spec
from tests.helpers.tiny_models import NEEDS_COMPILER, NEEDS_KERNEL

from .test_service_core import TINY, make_core, run, save_tiny_model

PROMPT = [5, 17, 99, 3, 42, 7, 64, 201, 13, 88]
WINDOW = 6
BLOCK = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    save_tiny_model(store.root)
    return store


def engine(store: ArtifactStore, window: int | None, compile: bool = False, kernel: bool = True) -> LLMEngine:
    kv = KVCacheConfig(block_size=BLOCK, num_blocks=64)
    config = EngineConfig(kv_cache=kv, sliding_window=window, compile=compile, attention_kernel=kernel)
    return LLMEngine(load_model(TINY, store), config)


def windowed_reference(store: ArtifactStore, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by the plain model over the whole sequence each step, with an explicit mask
    letting position i see positions i - WINDOW + 1 .. i: (tokens, each token's log-probability)."""
    model = load_model(TINY, store).module
    tokens, logprobs = list(prompt), []
    with torch.inference_mode():
        for _ in range(steps):
            n = len(tokens)
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            allowed = (j <= i) & (i - j < WINDOW)
            mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]
            logits = model(torch.tensor([tokens]), attention_mask=mask).logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(logits.log_softmax(-1)[token]))
    return tokens[len(prompt) :], logprobs


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=NEEDS_KERNEL), False], ids=["kernel", "tensor-ops"])
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=NEEDS_COMPILER)], ids=["eager", "compiled"])
def test_output_equals_attention_under_an_explicit_windowed_mask(
    store: ArtifactStore, compile: bool, kernel: bool
) -> None:
    """Decoding rows' attention reads the cache in place, through the engine's kernel or the compiled
    graph's loops, or over gathered blocks (eager tensor operations): grouped query heads, padding
    and freed blocks hidden by the mask, in every case."""
    steps = 24
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True, logprobs=0)
    # Two requests at once, so prompt chunks and decode steps of different lengths share steps.
    windowed = engine(store, WINDOW, compile, kernel)
    assert windowed.runner.kernel is kernel
    outs = windowed.generate([PROMPT, PROMPT[:7]], params)
    assert not compile or windowed.runner.compiled is not None, "the compiled graph failed and fell back to eager"
    for prompt, out in zip([PROMPT, PROMPT[:7]], outs, strict=True):
        tokens, logprobs = windowed_reference(store, prompt, steps)
        assert out.outputs[0].token_ids == tokens
        got = [lp.logprob for lp in out.outputs[0].logprobs]
        assert got == pytest.approx(logprobs, abs=1e-4)
    unwindowed = engine(store, None).generate([PROMPT], params)[0].outputs[0].token_ids
    assert unwindowed != outs[0].outputs[0].token_ids  # the window changed what the model saw


def used_blocks_while_generating(store: ArtifactStore, window: int | None, tokens: int) -> list[int]:
    e = engine(store, window)
    e.add_request(PROMPT, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    used = []
    while e.has_unfinished():
        e.step()
        used.append(e.cache.pool.num_used)
    return used


def test_blocks_out_of_the_window_are_freed(store: ArtifactStore) -> None:
    tokens = 100
    bounded = used_blocks_while_generating(store, WINDOW, tokens)
    growing = used_blocks_while_generating(store, None, tokens)
    assert max(growing) == 27  # 108 tokens in blocks of 4 before the last step, which ends the request
    # The window's 6 tokens span at most 3 blocks, and the block being filled may be one more.
    assert max(bounded) <= 3
    assert bounded[-1] == growing[-1] == 0  # all freed at the end


def test_a_window_below_one_token_is_refused_naming_the_field(store: ArtifactStore) -> None:
    spec = model_spec(pb.LoadModelRequest(path=TINY, engine=pb.EngineOptions(sliding_window=0)))
    assert spec.engine.sliding_window == 0
    assert model_spec(pb.LoadModelRequest(path=TINY)).engine.sliding_window is None
    for window in (0, -3):
        with pytest.raises(InvalidArgument) as e:
            run(make_core(store).load_model(ModelSpec("w", TINY, engine=EngineOptions(sliding_window=window))))
        assert e.value.field == "engine.sliding_window"
    with pytest.raises(InvalidArgument) as e:
        engine(store, 0)
    assert e.value.field == "sliding_window"


def test_a_served_model_with_a_window(store: ArtifactStore) -> None:
    """The load option reaches the replica's engine: generation through the core equals the engine's."""
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)

    async def scenario() -> list[int]:
        core = make_core(store)
        await core.load_model(ModelSpec("w", TINY, engine=EngineOptions(sliding_window=WINDOW)))
        chunk = await core.generate("w", GenerateInput("", params, token_ids=tuple(PROMPT)))
        return chunk.completions[0].token_ids

    assert run(scenario()) == windowed_reference(store, PROMPT, 20)[0]
