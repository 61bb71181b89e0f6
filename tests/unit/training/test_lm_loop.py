"""The training loop's data order: deterministic by step, every row once per epoch, held-out rows apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.training.dataprep import PackConfig, PackWriter
from services.training.jobs.lm_loop import Batches


def _packed(tmp_path: Path, sequences: int, seq_len: int = 4) -> Path:
    writer = PackWriter(PackConfig(seq_len=seq_len, eos_id=0, vocab_size=1000, sequences_per_shard=7), tmp_path)
    for i in range(sequences):
        writer.add([i + 1] * (seq_len - 1))  # + EOS: each sequence is one document, first id = i + 1
    writer.close()
    return tmp_path


def test_batches_are_deterministic_and_cover_each_epoch(tmp_path: Path) -> None:
    data = Batches(_packed(tmp_path, 40), eval_fraction=0.1, seed=3)
    assert (len(data.train), len(data.heldout)) == (36, 4)
    assert set(data.heldout[:, 0]) == {37, 38, 39, 40}
    epoch = data.batch(0, 36)[:, 0].tolist()
    assert sorted(epoch) == list(range(1, 37)) and epoch != sorted(epoch)
    again = Batches(tmp_path, eval_fraction=0.1, seed=3)
    assert np.array_equal(again.batch(50, 8).numpy(), data.batch(50, 8).numpy())  # a resumed run reads the same rows
    assert sorted(data.batch(36, 36)[:, 0].tolist()) == list(range(1, 37))
