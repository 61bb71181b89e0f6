"""A replica's ModelServer in a process of its own (engine_process.ModelProcess), without Ray: the same
answers as the engine in process, a request closed early aborted there, errors reaching the caller as
they were raised, and a child that dies failing its requests and the health check."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import psutil
import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument, LlmpError, NotFound, Unavailable
from services.inference.engine import SamplingLimits
from services.inference.engine_process import ModelProcess
from services.inference.schema import Chunk, EngineOptions, GenerateInput, ModelSpec
from tests.helpers.inference_core import greedy, reference, run
from tests.helpers.tiny_models import TINY, save_tiny_model

pytestmark = pytest.mark.integration

PROMPT = (5, 17, 99, 3, 42)
LONG = 100_000
STRETCHED = EngineOptions(rope_scaling=json.dumps({"rope_type": "linear", "factor": 1024}))
"""The tiny model's context stretched (128 -> 131,072 tokens): a LONG request runs for minutes."""
LIMITS = SamplingLimits(max_n=4, max_tokens=LONG)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    save_tiny_model(store.root)
    return store


async def started(store: ArtifactStore, spec: ModelSpec | None = None) -> ModelProcess:
    return await ModelProcess.start(spec or ModelSpec("tiny", TINY), str(store.root), LIMITS, "replica-1")


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.05)


def request(rid: str, max_tokens: int = 12, *, stream: bool = True) -> GenerateInput:
    return GenerateInput(rid, greedy(max_tokens), token_ids=PROMPT, stream=stream)


async def collect(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in chunks]


def test_answers_equal_the_engine_in_process_and_the_child_ends_with_its_socket(store: ArtifactStore) -> None:
    expected = reference(store, list(PROMPT), greedy())

    async def scenario() -> tuple[list[Chunk], list[Chunk], list[list[Chunk]], psutil.Process, int | None]:
        server = await started(store)
        child = psutil.Process(server.proc.pid)
        try:
            whole = await collect(server.generate(request("whole", stream=False)))
            streamed = await collect(server.generate(request("streamed")))
            together = await asyncio.gather(*(collect(server.generate(request(f"r{i}"))) for i in range(8)))
            stats = await asyncio.to_thread(server.stats)
            assert (stats.replica_id, stats.running, stats.kv_cache_usage) == ("replica-1", 0, 0.0)
            assert stats.max_model_len == 128 and server.load_seconds > 0
            server.check_health()
        finally:
            server.close()
        return whole, streamed, together, child, server.proc.returncode

    whole, streamed, together, child, returncode = run(scenario())
    assert len(whole) == 1 and whole[0].completions[0].token_ids == expected and whole[0].finished
    assert [t for c in streamed for t in c.completions[0].token_ids] == expected and streamed[-1].finished
    assert all([t for c in chunks for t in c.completions[0].token_ids] == expected for chunks in together)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert returncode == 0, "the child ended by itself at the end of its socket, not killed"


def test_a_request_closed_early_is_aborted_in_the_child_and_others_go_on(store: ArtifactStore) -> None:
    async def scenario() -> list[Chunk]:
        server = await started(store, ModelSpec("long", TINY, engine=STRETCHED))
        try:
            chunks = server.generate(request("long", LONG))
            first = await anext(chunks)
            assert not first.finished and first.completions[0].token_ids
            assert (await asyncio.to_thread(server.stats)).running == 1
            await chunks.aclose()

            async def freed() -> bool:
                stats = await asyncio.to_thread(server.stats)
                return stats.running == 0 and stats.kv_cache_usage == 0.0

            await until(freed)
            return await collect(server.generate(request("after")))
        finally:
            server.close()

    after = run(scenario())
    assert after[-1].finished and after[-1].completion_tokens == 12


def test_errors_reach_the_caller_as_raised_and_leave_the_child_healthy(store: ArtifactStore) -> None:
    async def scenario() -> None:
        with pytest.raises(NotFound) as missing:
            await started(store, ModelSpec("gone", "models/gone/1"))
        assert missing.value.field == "model" and "models/gone/1" in missing.value.message
        with pytest.raises(LlmpError) as unknown:
            await started(store, ModelSpec("odd", TINY, engine=EngineOptions(quantization="no-such-scheme")))
        assert unknown.value.field == "quantization.type"

        server = await started(store)
        try:
            too_long = GenerateInput("too-long", greedy(), token_ids=tuple(range(5, 205)))
            with pytest.raises(InvalidArgument) as refused:
                await collect(server.generate(too_long))
            assert refused.value.field is not None
            server.check_health()
            assert (await collect(server.generate(request("fine"))))[-1].finished
        finally:
            server.close()

    run(scenario())


def test_a_dead_child_fails_its_requests_and_the_health_check(store: ArtifactStore) -> None:
    async def scenario() -> None:
        server = await started(store, ModelSpec("long", TINY, engine=STRETCHED))
        try:
            chunks = server.generate(request("long", LONG))
            await anext(chunks)
            server.proc.kill()
            with pytest.raises(Unavailable):
                async for _ in chunks:
                    pass
            with pytest.raises(RuntimeError, match="engine process"):
                server.check_health()
            with pytest.raises(Unavailable):
                await collect(server.generate(request("later")))
        finally:
            server.close()

    run(scenario())
