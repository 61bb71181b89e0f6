"""The vLLM side of `bench.vllm_cpu`, run inside vLLM's own virtual environment (make vllm-env).

It imports nothing from llmp: vLLM pins its own transformers, so it lives in a venv of its own.
It loads the model once, then times one row at a time as the bench asks, so that the bench can
alternate between the two engines row by row. Requests come as JSON lines on stdin; answers go as
JSON lines to the file descriptor named by its argument (vLLM's own output goes to the terminal):

    argv: FD; stdin first line: {"model": DIR, "dtype": "float32", "max_model_len": 1024}
    -> {"startup": seconds}                          once loaded and warmed up
    {"prompts": [[ids]], "max_tokens": N}          -> {"seconds": s}   one batch, all at once
    {"prompts": [[ids]], "max_tokens": [N], "arrivals": [s]}
                                                   -> {"seconds": s}   requests added as their
                                                      arrival times pass, the engine stepped in
                                                      between, as bench.vllm_cpu does with ours

Every request must produce exactly its max_tokens (greedy, end token ignored), or the worker fails.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    answers = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    setup = json.loads(sys.stdin.readline())
    started = time.perf_counter()
    llm = LLM(
        model=setup["model"],
        skip_tokenizer_init=True,
        dtype=setup["dtype"],
        max_model_len=setup["max_model_len"],
        seed=0,
    )

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True, detokenize=False)

    def prompts(ids: list[list[int]]) -> list[TokensPrompt]:
        return [TokensPrompt(prompt_token_ids=p) for p in ids]

    def batch(row: dict) -> float:
        start = time.perf_counter()
        outputs = llm.generate(prompts(row["prompts"]), params(row["max_tokens"]), use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == row["max_tokens"] for o in outputs)
        return seconds

    def mixed(row: dict) -> float:
        engine = llm.llm_engine
        start, added, count = time.perf_counter(), 0, len(row["prompts"])
        while added < count or engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while added < count and row["arrivals"][added] <= now:
                prompt = TokensPrompt(prompt_token_ids=row["prompts"][added])
                engine.add_request(f"mixed-{added}", prompt, params(row["max_tokens"][added]))
                added += 1
            if engine.has_unfinished_requests():
                engine.step()
            else:
                time.sleep(max(0.0, row["arrivals"][added] - now))
        return time.perf_counter() - start

    llm.generate(prompts([[5] * 8, [7] * 8]), params(4), use_tqdm=False)  # warm-up
    answers.write(json.dumps({"startup": time.perf_counter() - started}) + "\n")
    for line in sys.stdin:
        row = json.loads(line)
        seconds = mixed(row) if "arrivals" in row else batch(row)
        answers.write(json.dumps({"seconds": seconds}) + "\n")


if __name__ == "__main__":  # spawned engine processes re-import this module: keep the guard
    main()
