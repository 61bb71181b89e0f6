"""The inference service as the main job measures it (gRPC, behind the gateway): load replicas,
time greedy decoding, count speculative acceptance, and score held-out text.

Held-out perplexity is measured on the served replica itself (so the INT8 figure is the INT8
model's): for each position t of a held-out sequence, one request with the first t tokens, one
new token, a logit bias that forces the true next token, and its log-probability, which the
engine computes from the raw logits (before the bias). Requests run concurrently, so the engine
batches them and the prefix cache shares their common prompts.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from llmp.inference.v1 import inference_pb2 as ipb
from llmp.inference.v1 import inference_pb2_grpc as ipb_grpc

from libs.common.rpc.client import address, channel

FORCE = 100.0  # logit bias that makes the true next token the greedy choice (the most the engine accepts)
KV_CACHE_BYTES = 64 << 20  # per replica: the demo's models are small and its requests short (default 512 MiB)
REPLICA_CPUS = 0.25  # three replicas share two cores; Ray must not wait for a whole CPU each


class Inference:
    def __init__(self) -> None:
        self.channel = channel(address("inference"))
        self.stub = ipb_grpc.InferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def ensure_loaded(self, name: str, path: str, **engine: Any) -> ipb.ModelInfo:
        """Serve `path` as `name` with these engine options, replacing a replica of other options."""
        engine = {"kv_cache_bytes": KV_CACHE_BYTES, **engine}
        wanted = ipb.EngineOptions(**engine)
        try:
            info = self.stub.GetModelInfo(ipb.GetModelInfoRequest(model=name))
            same = info.path == path and all(getattr(info.engine, k) == v for k, v in engine.items())
            if same:
                return info
            self.stub.UnloadModel(ipb.UnloadModelRequest(model=name))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
        replicas = ipb.ReplicaOptions(num_cpus=REPLICA_CPUS, min_replicas=1, max_replicas=1)
        return self.stub.LoadModel(ipb.LoadModelRequest(path=path, name=name, replicas=replicas, engine=wanted))

    def unload(self, name: str) -> None:
        try:
            self.stub.UnloadModel(ipb.UnloadModelRequest(model=name))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise

    def info(self, name: str) -> ipb.ModelInfo:
        return self.stub.GetModelInfo(ipb.GetModelInfoRequest(model=name))

    def greedy(self, model: str, ids: list[int], max_tokens: int, ignore_eos: bool = True) -> ipb.GenerateResponse:
        request = ipb.GenerateRequest(
            model=model,
            token_ids=ipb.TokenIds(ids=ids),
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=ignore_eos,
        )
        reply: ipb.GenerateResponse = self.stub.Generate(request, timeout=600)
        return reply

    def next_logprob(self, model: str, prefix: list[int], token: int) -> float:
        request = ipb.GenerateRequest(
            model=model,
            token_ids=ipb.TokenIds(ids=prefix),
            max_tokens=1,
            temperature=0.0,
            logit_bias={token: FORCE},
            logprobs=0,
            ignore_eos=True,
        )
        reply = self.stub.Generate(request, timeout=600)
        lp = reply.completions[0].logprobs[0]
        if lp.token_id != token:
            raise RuntimeError(f"forced token {token} but the replica chose {lp.token_id}")
        return float(lp.logprob)

    def perplexity(self, model: str, sequences: list[list[int]], workers: int = 8) -> float:
        """exp(mean negative log-likelihood) of every token after the first, on the served replica."""
        pairs = [(seq[:t], seq[t]) for seq in sequences for t in range(1, len(seq))]
        with ThreadPoolExecutor(workers) as pool:
            logprobs = list(pool.map(lambda pair: self.next_logprob(model, *pair), pairs))
        return math.exp(-sum(logprobs) / len(logprobs))


@dataclass
class Decoding:
    """Greedy decoding of a set of prompts, one at a time (batch 1, where speculation pays)."""

    outputs: list[list[int]]
    tokens: int
    seconds: float
    latencies: list[float]
    drafted: int
    accepted: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def decode(
    inference: Inference, models: dict[str, str], prompts: list[list[int]], max_tokens: int, rounds: int = 2
) -> dict[str, Decoding]:
    """Greedy decoding of each prompt by each model (kind -> served name), the models taking turns prompt
    by prompt so the machine's other load falls on all alike; each prompt's best time of `rounds` counts."""
    for name in models.values():
        inference.greedy(name, prompts[0], 2)  # warm each replica (first-call allocations)
    best = {kind: [float("inf")] * len(prompts) for kind in models}
    replies: dict[str, list[ipb.Completion]] = {kind: [] for kind in models}
    for round_ in range(rounds):
        for i, ids in enumerate(prompts):
            for kind, name in models.items():
                started = time.perf_counter()
                completion = inference.greedy(name, ids, max_tokens).completions[0]
                best[kind][i] = min(best[kind][i], time.perf_counter() - started)
                if round_ == rounds - 1:
                    replies[kind].append(completion)
    out = {}
    for kind, completions in replies.items():
        outputs = [list(c.token_ids) for c in completions]
        drafted = sum(c.draft_tokens for c in completions)
        accepted = sum(c.accepted_draft_tokens for c in completions)
        tokens = sum(len(o) for o in outputs)
        out[kind] = Decoding(outputs, tokens, sum(best[kind]), best[kind], drafted, accepted)
    return out
