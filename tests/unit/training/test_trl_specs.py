"""The trl trainers as the alignment jobs build them, run in-process on a tiny model (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from services.training.jobs.builtin_data import instruction_pairs
from services.training.jobs.hf_loop import HFLoop, arguments
from services.training.jobs.trl_specs import SFTSpec
from tests.helpers.training import EOS


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, bpe: Tokenizer) -> Path:
    """A tiny Llama and the reference text's BPE, as a registered model's folder holds them."""
    folder = tmp_path_factory.mktemp("base")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=0,
        bos_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def held_out_loss(base: Path, tmp_path: Path, records: list[dict[str, Any]], packing: bool) -> tuple[float, int]:
    """The held-out loss of the untrained model and the rows the held-out set became."""
    spec = SFTSpec(str(base), None, True, "", 1024, completion_only=True, packing=packing)
    loop = HFLoop(max_steps=1, warmup_steps=0, micro_batch_size=len(records))  # one batch holds every example
    trainer = spec.build(arguments(loop, tmp_path / str(packing)), records, records)
    rows: Any = trainer.eval_dataset
    return float(trainer.evaluate()["eval_loss"]), len(rows)


def test_sft_with_packing_gives_the_loss_it_gives_without(base: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    records = [{"prompt": r["prompt"], "completion": r["completion"]} for r in instruction_pairs()[:12]]
    (padded, rows), (packed, packed_rows) = (held_out_loss(base, tmp_path, records, p) for p in (False, True))
    assert rows == len(records) and packed_rows < rows / 2  # several examples share each packed row
    # The same completion tokens, each seeing only its own example: packed rows must not leak across examples.
    assert packed == pytest.approx(padded, rel=1e-4), (packed, padded)
