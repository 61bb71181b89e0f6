"""Step checkpoints: written whole, read back, and old ones pruned only after a new one is on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from libs.common.artifacts import ArtifactStore
from services.training import checkpoints
from services.training.checkpoints import TrainState


class BrokenSchedule(torch.optim.lr_scheduler.LambdaLR):
    """A schedule whose state cannot be saved: the write fails halfway through the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        raise OSError("disk full")


def parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def steps(store: ArtifactStore, job_id: str) -> list[str]:
    return [p.name for p in checkpoints.step_dirs(store, job_id)]


def test_keeps_the_newest_and_restores_them(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    model, optimizer, schedule = parts()
    for step in (10, 20, 30):
        checkpoints.save(store, "job", TrainState(step, step * 100), model, optimizer, schedule, keep=2)
    assert steps(store, "job") == ["step-00000020", "step-00000030"]
    fresh, fresh_optimizer, fresh_schedule = parts()
    with torch.no_grad():
        fresh.weight.zero_()
    latest = checkpoints.latest(store, "job")
    assert latest is not None
    state = checkpoints.restore(latest, fresh, fresh_optimizer, fresh_schedule)
    assert state == TrainState(30, 3000)
    assert torch.equal(fresh.weight, model.weight)


def test_a_failed_save_prunes_nothing_and_leaves_no_partial_checkpoint(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    model, optimizer, schedule = parts()
    for step in (10, 20):
        checkpoints.save(store, "job", TrainState(step), model, optimizer, schedule, keep=2)
    broken = BrokenSchedule(optimizer, lambda step: 1.0)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save(store, "job", TrainState(30), model, optimizer, broken, keep=2)
    assert steps(store, "job") == ["step-00000010", "step-00000020"]
    assert list((store.root / ".staging").iterdir()) == []
