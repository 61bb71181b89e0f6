"""The vLLM side of `bench.vllm_cpu`, run inside vLLM's own virtual environment (make vllm-env).

It imports nothing from llmp: vLLM pins its own transformers, so it lives in a venv of its own.
Reads a JSON workload on stdin and writes one JSON object of timings to the file named by its
argument (vLLM's own output goes to the terminal):

    {"model": DIR, "dtype": "float32", "max_model_len": 1024,
     "batches": [{"name": ..., "prompts": [[ids]], "max_tokens": N}],
     "mixed": {"prompts": [[ids]], "max_tokens": [N], "arrivals": [s]}, "repeats": 2}
    -> {"batches": {name: seconds}, "mixed": seconds, "startup": seconds}

Each batch is run `repeats` times and the best time kept, after a warm-up; mixed requests are added to the
engine as their arrival times pass, with the engine stepped in between, as bench.vllm_cpu does
with ours.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    work = json.load(sys.stdin)
    started = time.perf_counter()
    llm = LLM(
        model=work["model"],
        skip_tokenizer_init=True,
        dtype=work["dtype"],
        max_model_len=work["max_model_len"],
        seed=0,
    )
    startup = time.perf_counter() - started

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True, detokenize=False)

    def prompts(ids: list[list[int]]) -> list[TokensPrompt]:
        return [TokensPrompt(prompt_token_ids=p) for p in ids]

    llm.generate(prompts(work["batches"][0]["prompts"][:2]), params(4), use_tqdm=False)  # warm-up
    batches: dict[str, float] = {}
    for batch in work["batches"]:
        best = float("inf")
        for _ in range(work["repeats"]):
            t0 = time.perf_counter()
            outputs = llm.generate(prompts(batch["prompts"]), params(batch["max_tokens"]), use_tqdm=False)
            best = min(best, time.perf_counter() - t0)
            assert all(len(o.outputs[0].token_ids) == batch["max_tokens"] for o in outputs)
        batches[batch["name"]] = best

    mixed = work["mixed"]
    engine = llm.llm_engine
    start, added, count = time.perf_counter(), 0, len(mixed["prompts"])
    while added < count or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while added < count and mixed["arrivals"][added] <= now:
            prompt = TokensPrompt(prompt_token_ids=mixed["prompts"][added])
            engine.add_request(f"mixed-{added}", prompt, params(mixed["max_tokens"][added]))
            added += 1
        if engine.has_unfinished_requests():
            engine.step()
        else:
            time.sleep(max(0.0, mixed["arrivals"][added] - now))
    seconds = time.perf_counter() - start
    with open(sys.argv[1], "w") as out:
        json.dump({"batches": batches, "mixed": seconds, "startup": startup}, out)


if __name__ == "__main__":  # spawned engine processes re-import this module: keep the guard
    main()
