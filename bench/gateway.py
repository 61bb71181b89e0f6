"""Gateway benchmarks: the cost of the hop, generation through it, and 64 streams for a minute.

Real processes on loopback: Redis, the inference service (its in-process backend, so the engine
and the gRPC front are those of a Ray Serve replica without Ray on a shared machine) serving a
random 4-layer Llama, and the gateway in front. Ratios are against references measured in the
same run:

1. Added latency of a non-generating call (the model list): the backend called directly over
   gRPC, the same call through the gateway's gRPC side, and GET /v1/models over HTTP; p50 and p99
   of each, and what the gateway adds (target <= 2 ms at p50).
2. Generation through the gateway's HTTP (16 and 64 concurrent clients, one request each, token-id
   prompts, greedy, 64 tokens) against the in-process engine generating the same requests at once
   (target >= 0.8x tokens/s).
3. 64 concurrent streaming clients for a minute (--quick: 15 s): every stream is checked against
   the non-streamed answer to the same prompt (no lost, duplicated or truncated chunk, usage and
   finish reason present, [DONE] last); throughput and time-to-first-token percentiles.

Run: python -m bench gateway [--quick] [--threads=N]  (the engine's threads, in both processes; default 1)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import torch
from llmp.inference.v1 import inference_pb2 as ipb
from llmp.inference.v1 import inference_pb2_grpc as ipb_grpc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig

from libs.common.artifacts import ArtifactStore
from libs.common.rpc.client import wait_serving
from libs.common.stack import free_port, redis_server_binary
from services.inference.engine import LLMEngine, SamplingLimits, SamplingParams, load_model
from services.inference.model_server import engine_config
from services.inference.schema import EngineOptions

MODEL = "models/bench/1"
NEW_TOKENS = 64
ROOT = Path(__file__).resolve().parents[1]


def save_model(root: Path) -> None:
    """A random 4-layer Llama (hidden 256) over a byte-level tokenizer: speed only."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=688,
        vocab_size=256, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(root / MODEL, safe_serialization=True)
    tokenizer = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(root / MODEL / "tokenizer.json"))


def running(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: proc.poll() is None


@dataclass
class Stack:
    home: Path
    inference: str
    gateway_grpc: str
    http: str
    key: str


@contextmanager
def stack(threads: int) -> Iterator[Stack]:
    home = Path(tempfile.mkdtemp(prefix="llmp-bench-gateway-"))
    save_model(home / "artifacts")
    procs: list[subprocess.Popen[bytes]] = []
    redis_port, inference_port, gateway_port, http_port = (free_port() for _ in range(4))
    env = {**os.environ, "LLMP_HOME": str(home), "LLMP_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "LLMP_LOG_LEVEL": "WARNING", "LLMP_INFERENCE_BACKEND": "local", "LLMP_GATEWAY_HTTP_PORT": str(http_port),
           "LLMP_INFERENCE_ADDRESS": f"127.0.0.1:{inference_port}", "LLMP_GATEWAY_MAX_IN_FLIGHT": "1024",
           "LLMP_GATEWAY_REQUESTS_PER_MINUTE": "0", "LLMP_GATEWAY_TOKENS_PER_MINUTE": "0",
           "OMP_NUM_THREADS": str(threads)}  # fmt: skip
    log = open(home / "bench.log", "wb")  # noqa: SIM115 - closed below
    try:
        argv = [redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
        procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
        for name, port in (("inference", inference_port), ("gateway", gateway_port)):
            argv = [sys.executable, "-m", f"services.{name}", "--port", str(port), "--metrics-port", "-1"]
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)
            procs.append(proc)
            if not wait_serving(f"127.0.0.1:{port}", 240, is_alive=running(proc)):
                raise RuntimeError(f"{name} did not start; see {home / 'bench.log'}")
        key = (home / "secrets" / "admin.key").read_text().strip()
        with grpc.insecure_channel(f"127.0.0.1:{inference_port}") as ch:
            ipb_grpc.InferenceServiceStub(ch).LoadModel(ipb.LoadModelRequest(path=MODEL, name="bench"), timeout=240)
        yield Stack(
            home, f"127.0.0.1:{inference_port}", f"127.0.0.1:{gateway_port}", f"http://127.0.0.1:{http_port}", key
        )
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(60)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    for _ in range(20):  # warm the connections
        await call()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        out.append((time.perf_counter() - start) * 1000)
    return out


async def hop(s: Stack, n: int) -> dict[str, list[float]]:
    """Latency in ms of the model list: direct, through the gateway's gRPC side, over its HTTP."""
    auth = (("authorization", f"Bearer {s.key}"),)
    async with grpc.aio.insecure_channel(s.inference) as direct_ch, grpc.aio.insecure_channel(s.gateway_grpc) as gw_ch:
        direct = ipb_grpc.InferenceServiceStub(direct_ch)
        through = ipb_grpc.InferenceServiceStub(gw_ch)
        async with httpx.AsyncClient(base_url=s.http, headers={"authorization": f"Bearer {s.key}"}) as http:
            out: dict[str, list[float]] = {}
            for _ in range(2):  # interleave: the machine is shared
                out.setdefault("direct gRPC", []).extend(
                    await timed(lambda: direct.ListModels(ipb.ListModelsRequest()), n)
                )
                out.setdefault("gateway gRPC", []).extend(
                    await timed(lambda: through.ListModels(ipb.ListModelsRequest(), metadata=auth), n)
                )
                out.setdefault("gateway HTTP", []).extend(await timed(lambda: http.get("/v1/models"), n))
    return out


def prompts(count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (16,), generator=g).tolist() for _ in range(count)]


def engine_rate(s: Stack, batch: list[list[int]]) -> float:
    """Tokens/s of the in-process engine (the service's settings) generating `batch` at once."""
    store = ArtifactStore(s.home / "artifacts")
    engine = LLMEngine(load_model(MODEL, store), engine_config(EngineOptions(), SamplingLimits()))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    engine.generate(batch[:2], params)  # warm-up
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        outputs = engine.generate(batch, params)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        best = max(best, tokens / (time.perf_counter() - start))
    return best


async def gateway_rate(s: Stack, batch: list[list[int]]) -> float:
    """Tokens/s through the gateway's HTTP: one client per request, all at once."""
    limits = httpx.Limits(max_connections=len(batch) + 4)
    async with httpx.AsyncClient(
        base_url=s.http, headers={"authorization": f"Bearer {s.key}"}, timeout=600, limits=limits
    ) as http:

        async def one(prompt: list[int]) -> int:
            body = {"model": "bench", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
            reply = await http.post("/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
            return int(reply.json()["usage"]["completion_tokens"])

        await asyncio.gather(*(one(p) for p in batch[:2]))
        best = 0.0
        for _ in range(2):
            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(p) for p in batch)))
            best = max(best, tokens / (time.perf_counter() - start))
    return best


@dataclass
class Soak:
    streams: int = 0
    bad: int = 0
    tokens: int = 0
    ttft_ms: list[float] | None = None
    seconds: float = 0.0


async def soak(s: Stack, clients: int, seconds: float, new_tokens: int = 32) -> Soak:
    """`clients` streaming clients in a loop for `seconds`; each stream checked against the unstreamed answer."""
    pool = prompts(8)
    headers = {"authorization": f"Bearer {s.key}"}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=s.http, headers=headers, timeout=600, limits=limits) as http:
        expected = []
        for p in pool:
            body = {"model": "bench", "prompt": p, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
            expected.append((await http.post("/v1/completions", json=body)).json()["choices"][0]["text"])
        result = Soak(ttft_ms=[])
        end = time.monotonic() + seconds

        async def client(i: int) -> None:
            n = i
            while time.monotonic() < end:
                n += 1
                body = {"model": "bench", "prompt": pool[n % 8], "max_tokens": new_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
                start = time.perf_counter()
                first, text, finishes, usage, done, after_done = None, "", 0, None, False, False
                async with http.stream("POST", "/v1/completions", json=body) as reply:
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if done:
                            after_done = True
                        if line == "data: [DONE]":
                            done = True
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        for choice in chunk.get("choices", []):
                            first = first or time.perf_counter()
                            text += choice["text"]
                            finishes += choice["finish_reason"] is not None
                ok = (done and not after_done and text == expected[n % 8] and finishes == 1
                      and usage is not None and usage["completion_tokens"] == new_tokens)  # fmt: skip
                result.streams += 1
                result.bad += not ok
                result.tokens += usage["completion_tokens"] if usage else 0
                if first is not None:
                    result.ttft_ms.append((first - start) * 1000)  # type: ignore[union-attr]

        start = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(clients)))
        result.seconds = time.monotonic() - start
    return result


def main() -> None:
    quick = "--quick" in sys.argv
    # The engine's threads, here and in the service (OMP_NUM_THREADS): on a machine shared with other
    # work, two OpenMP threads that wait on each other can be 30x slower than one; default 1.
    threads = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--threads=")), 1)
    torch.set_num_threads(threads)
    with stack(threads) as s:
        latencies = asyncio.run(hop(s, 150 if quick else 500))
        print("\n1. a non-generating call (the model list), ms over loopback")
        print(f"   {'path':<14}{'p50':>8}{'p99':>8}   added p50   added p99")
        base = latencies["direct gRPC"]
        for name, values in latencies.items():
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            added = (
                ""
                if name == "direct gRPC"
                else f"{p50 - percentile(base, 0.5):>11.2f} {p99 - percentile(base, 0.99):>11.2f}"
            )
            print(f"   {name:<14}{p50:>8.2f}{p99:>8.2f} {added}")
        print(f"\n2. generation, {NEW_TOKENS} tokens per request, tokens/s (target >= 0.8x the in-process engine)")
        for clients in (16, 64):
            batch = prompts(clients)
            engine = engine_rate(s, batch)
            through = asyncio.run(gateway_rate(s, batch))
            ratio = through / engine
            print(f"   {clients:>3} clients: engine {engine:8.1f}   gateway HTTP {through:8.1f}   ratio {ratio:.2f}x")
        duration = 15.0 if quick else 60.0
        result = asyncio.run(soak(s, 64, duration))
        ttft = result.ttft_ms or [0.0]
        print(f"\n3. 64 streaming clients for {result.seconds:.0f} s")
        print(f"   streams {result.streams}, bad (lost, duplicated or truncated) {result.bad}, "
              f"tokens/s {result.tokens / result.seconds:.1f}, "
              f"TTFT p50 {percentile(ttft, 0.5):.0f} ms, p90 {percentile(ttft, 0.9):.0f} ms, "
              f"p99 {percentile(ttft, 0.99):.0f} ms, mean {statistics.mean(ttft):.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
