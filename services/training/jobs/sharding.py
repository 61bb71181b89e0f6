"""FSDP for the language-model loop (`fsdp: true`): parameters, gradients and optimiser state sharded over the workers.

PyTorch's FSDP2 (`fully_shard`): each transformer block (every module of the model's ModuleLists)
is a unit whose parameters are all-gathered just before its forward and backward and freed after,
and the root holds the rest (embeddings, head). Parameters stay DTensors of their full shapes, so
the optimiser's groups (decay on matrices only) are built as for DDP. On a GPU with bf16 the
blocks compute in bf16 and reduce gradients in fp32; the master weights stay fp32.

Checkpoints keep the format of services.training.checkpoints (model.safetensors, optimizer.pt,
state.json), written from full state dicts gathered to rank 0 (`save`), so the files are those of
an unsharded run; `restore` loads them on rank 0 and broadcasts each shard to its owner. The
optimiser state is keyed by parameter names (torch.distributed.checkpoint's full form).

Every function here is collective: all workers call it, in the same order. FSDP needs the NCCL
backend (gloo has no reduce-scatter), so it runs only on GPU workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from libs.common.artifacts import ArtifactStore
from services.training import checkpoints
from services.training.checkpoints import TrainState

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Full tensors on rank 0's CPU, nothing on the other ranks."""
SCATTERED = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on `device`, each block and then the root wrapped by fully_shard."""
    model.to(device)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options: dict[str, Any] = {"mp_policy": policy} if policy else {}
    blocks = [block for module in model.modules() if isinstance(module, torch.nn.ModuleList) for block in module]
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


class _Gathered(torch.nn.Module):
    """A full state dict that checkpoints.save writes as it writes a module's or an optimiser's."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__()
        self.state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.state


def full_model_state(model: torch.nn.Module) -> dict[str, Any]:
    """The whole model's weights on rank 0's CPU ({} elsewhere)."""
    state, _ = get_state_dict(model, [], options=GATHERED)
    return state


def save(
    artifacts: ArtifactStore,
    run_id: str,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
) -> str:
    """Gather, then rank 0 writes a step checkpoint in the usual format; its store-relative path (on every rank)."""
    weights, optimiser = get_state_dict(model, optimizer, options=GATHERED)
    saved = [""]
    if dist.get_rank() == 0:
        as_optimizer: Any = _Gathered(optimiser)
        saved[0] = checkpoints.save(artifacts, run_id, state, _Gathered(weights), as_optimizer, scheduler, keep)
    dist.broadcast_object_list(saved, src=0)
    return saved[0]


def restore(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    """Load a checkpoint written by `save`: rank 0 reads it, every rank receives its shards."""
    weights: dict[str, Any] = {}
    saved: dict[str, Any] = {"optimizer": {}, "scheduler": None}
    if dist.get_rank() == 0:
        weights = load_file(str(path / "model.safetensors"))
        saved = torch.load(path / "optimizer.pt", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=saved["optimizer"], options=SCATTERED)
    schedule = [saved["scheduler"]]
    dist.broadcast_object_list(schedule, src=0)
    scheduler.load_state_dict(schedule[0])
    return TrainState(**json.loads((path / "state.json").read_text()))
