"""What a job may ask of a training worker: a GPU, and memory for the model, its optimiser and activations."""

from __future__ import annotations

from libs.common.errors import InvalidArgument
from libs.common.planning import GB, TrainingMemory
from services.training.jobs import JobContext


def check_gpu(use_gpu: bool, context: JobContext) -> None:
    """Refuse GPU workers from a service whose workers have none."""
    if use_gpu and context.worker_gpus < 1:
        raise InvalidArgument("this service's training workers have no GPU (worker_gpus is 0)", field="config.use_gpu")


def check_memory(context: JobContext, need: TrainingMemory, extra: int = 0, what: str = "the model size") -> None:
    """Refuse a job whose worker would need more than a worker has (`extra`: e.g. a frozen teacher)."""
    total = need.total + extra
    if total > context.worker_memory_bytes:
        raise InvalidArgument(
            f"training needs {total / GB:.2f} GB per worker (weights {need.weights / GB:.2f}, optimiser "
            f"{need.optimizer / GB:.2f}, activations {need.activations / GB:.2f}, other {extra / GB:.2f}) but a "
            f"worker has {context.worker_memory_bytes / GB:.2f} GB; lower micro_batch_size, seq_len or {what}",
            field="config.micro_batch_size",
        )
