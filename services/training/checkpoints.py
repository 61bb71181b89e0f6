"""Training checkpoints in the artifact store, written atomically, read back to resume.

    checkpoints/<job_id>/step-00000040/
        model.safetensors    the weights (shared tensors such as tied embeddings handled)
        optimizer.pt         optimiser and LR-schedule state: tensors and numbers only,
                             read back with `torch.load(weights_only=True)`
        state.json           {"step": 40, "tokens_seen": ...}
    checkpoints/<job_id>/final/   the finished model as a Hugging Face folder

A checkpoint appears in one rename (ArtifactStore.staging, which flushes it to disk first), so a
worker killed mid-write leaves the previous one as the latest. Only the newest `keep` step
checkpoints are kept, and an old one is removed only once the new one is complete on disk: a
save that fails removes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from libs.common.artifacts import ArtifactStore

KIND = "checkpoints"
PREFIX = "step-"


@dataclass(frozen=True)
class TrainState:
    step: int = 0
    tokens_seen: int = 0


def job_dir(job_id: str) -> str:
    return f"{KIND}/{job_id}"


def final_dir(job_id: str) -> str:
    return f"{KIND}/{job_id}/final"


def step_dirs(store: ArtifactStore, job_id: str) -> list[Path]:
    """This job's step checkpoints, oldest first."""
    root = store.path(job_dir(job_id))
    return sorted(root.glob(f"{PREFIX}*")) if root.is_dir() else []


def latest(store: ArtifactStore, job_id: str) -> Path | None:
    found = step_dirs(store, job_id)
    return found[-1] if found else None


def save(
    store: ArtifactStore,
    job_id: str,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
) -> str:
    """Write a step checkpoint, then drop the ones beyond `keep`; returns its store-relative path."""
    relative = f"{job_dir(job_id)}/{PREFIX}{state.step:08d}"
    with store.staging(relative, replace=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state.__dict__))
    # here the new checkpoint is renamed into place and flushed: only now may older ones go
    for old in step_dirs(store, job_id)[:-keep]:
        store.delete(store.relative(old))
    return relative


def restore(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    """Load a step checkpoint into the model, optimiser and schedule; returns where training was."""
    load_model(model, str(path / "model.safetensors"))
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return TrainState(**json.loads((path / "state.json").read_text()))
