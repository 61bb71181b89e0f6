"""The alignment rows of the training benchmark (bench/training.py prints them).

On the bench's model (the same Llama shape, fresh weights, the bench's BPE) and the built-in data
(pydoc:instructions, pydoc:preferences), in one fresh process with the run's threads:

- SFT (full and LoRA) and DPO: the jobs' own trl trainers (jobs/trl_specs.py) for STEPS steps after
  WARMUP, in-process (no Ray); tokens/s = the tokens of the examples the timed steps consumed
  (prompt + answer; DPO: prompt + chosen and prompt + rejected) over their time;
- PPO: the job's rollout and update (jobs/ppo_loop.py) with a reference copy and a reward model of
  the same shape; tokens/s = prompt + completion tokens of a step's rollout over the step's time,
  and the share of that time spent generating the rollout.

Each is printed against the plain PyTorch loop's tokens/s on the same model (bench/training.py's
reference), so the rows read as the cost of each method's extra work per token.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

WARMUP, STEPS = 2, 6
PROMPT_TOKENS, COMPLETION_TOKENS = 48, 32
"""PPO: prompts cut to this many tokens, completions of up to this many."""


class StepClock(TrainerCallback):
    """The time at the end of each optimiser step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())


def save_base(folder: Path, tokenizer: Tokenizer, config: LlamaConfig) -> None:
    """The bench's model, fresh, with its tokeniser, as a registered model's folder holds them."""
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def example_tokens(tokenizer: Tokenizer, records: list[dict[str, str]], answers: tuple[str, ...], cap: int) -> float:
    """Mean tokens an example puts through the model: prompt + each answer, each cut to `cap`."""
    per = [sum(min(len(tokenizer.encode(r["prompt"] + r[a]).ids), cap) for a in answers) for r in records[:200]]
    return statistics.mean(per)


def trl_rate(spec: Any, records: list[dict[str, str]], batch: int, tokens_per_example: float, out: Path) -> float:
    """Tokens/s of the spec's trainer over STEPS steps after WARMUP."""
    from services.training.jobs.hf_loop import HFLoop, arguments

    loop = HFLoop(max_steps=WARMUP + STEPS, warmup_steps=0, micro_batch_size=batch, checkpoint_every=10_000)
    settings = {**arguments(loop, out), "eval_strategy": "no", "save_strategy": "no"}
    trainer = spec.build(settings, records, records[:batch])
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    seconds = clock.ends[-1] - clock.ends[WARMUP - 1]
    return STEPS * batch * tokens_per_example / seconds


def ppo_rates(base: Path, prompts: list[str], batch: int) -> tuple[float, float]:
    """(tokens/s, share of the step spent generating) of PPO steps on the bench's model."""
    from services.training.jobs import ppo_loop
    from services.training.jobs.trl_specs import load_tokenizer

    tokenizer = load_tokenizer(str(base))
    policy = LlamaForCausalLM.from_pretrained(base)
    reference = LlamaForCausalLM.from_pretrained(base).eval().requires_grad_(False)
    reward_config = LlamaConfig(**{**policy.config.to_dict(), "num_labels": 1, "id2label": None})
    reward = LlamaForSequenceClassification(reward_config).eval().requires_grad_(False)
    model = ppo_loop.PolicyWithValue(policy, kl_coef=0.05)
    params = ppo_loop.PPOParams(max_completion_length=COMPLETION_TOKENS, ppo_epochs=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator()
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    tokens, seconds, generating = 0.0, 0.0, 0.0
    for step in range(WARMUP + STEPS):
        torch.manual_seed(step)
        generator.manual_seed(step)
        chosen = [prompts[(step * batch + i) % len(prompts)] for i in range(batch)]
        encoded = ppo_loop.encode_prompts(tokenizer, chosen, PROMPT_TOKENS)
        start = time.perf_counter()
        rollout = ppo_loop.rollout(model, reference, reward, encoded, params, eos, pad)
        generated = time.perf_counter()
        ppo_loop.update(model, optimizer, rollout, params, 0.05, max(1, batch // 2), 1.0, generator)
        end = time.perf_counter()
        if step >= WARMUP:
            tokens += float(rollout.attention_mask.sum())
            seconds += end - start
            generating += generated - start
    return tokens / seconds, generating / seconds


def measure(tokenizer: Tokenizer, config: LlamaConfig, batch: int, seq: int, threads: int) -> dict[str, float]:
    """Every alignment row's figures (run it in a fresh process: it sets the thread count)."""
    from services.training.jobs.builtin_data import instruction_pairs, pydoc_preferences
    from services.training.jobs.trl_specs import DPOSpec, SFTSpec

    torch.set_num_threads(threads)
    instructions = [{"prompt": r["prompt"], "completion": r["completion"]} for r in instruction_pairs()]
    preferences = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pydoc_preferences()]
    lora = {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": "all-linear"}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        save_base(base, tokenizer, config)
        sft_tokens = example_tokens(tokenizer, instructions, ("completion",), seq)
        dpo_tokens = example_tokens(tokenizer, preferences, ("chosen", "rejected"), seq)
        figures = {
            "sft": trl_rate(SFTSpec(str(base), None, True, "", seq), instructions, batch, sft_tokens, Path(tmp) / "s"),
            "sft_lora": trl_rate(
                SFTSpec(str(base), lora, True, "", seq), instructions, batch, sft_tokens, Path(tmp) / "l"
            ),
            "dpo": trl_rate(DPOSpec(str(base), None, True, "", seq), preferences, batch, dpo_tokens, Path(tmp) / "d"),
        }
        figures["ppo"], figures["ppo_rollout_share"] = ppo_rates(base, [r["prompt"] for r in instructions], batch)
    return figures


def show(figures: dict[str, float], reference: float) -> None:
    """The rows, against the plain loop's tokens/s (`reference`)."""
    print(f"  alignment on the bench's model ({STEPS} steps after {WARMUP}, in-process), vs the plain loop's tokens/s:")
    for key, label in (
        ("sft", "SFT, full (trl SFTTrainer)"),
        ("sft_lora", "SFT, LoRA rank 8"),
        ("dpo", "DPO (chosen + rejected, frozen reference)"),
        ("ppo", "PPO (rollout + 4 epochs, reference, reward model)"),
    ):
        print(f"  {label:56} {figures[key]:9.0f} vs {reference:9.0f} tokens/s   ratio {figures[key] / reference:.3f}")
    share = figures["ppo_rollout_share"]
    print(f"  PPO step time: {share:.1%} generating the rollout, {1 - share:.1%} training on it")
