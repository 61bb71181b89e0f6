"""The end of a training job: its final model registered, or the reason there is none.

Every job that trains a model ends with `register`: the run's final model
(`checkpoints/<job_id>/final/`) goes into the model registry with its tokeniser and lineage, and
the job records the metrics and the model's reference. A run that wrote no final model stopped
because it was asked to (the stop is the job's outcome) or failed (an error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.training import checkpoints
from services.training.jobs import DONE, JobContext
from services.training.jobstore import JobRecord
from services.training.registry import Lineage


@dataclass(frozen=True)
class NewModel:
    """What a job registers its final model as."""

    name: str
    """Name under which the model is registered."""
    tokenizer: str
    """The tokeniser's reference ("name:version"), for the lineage."""
    tokenizer_files: Path
    """The folder whose tokeniser files are copied beside the model."""
    datasets: list[str]
    """What it was trained on: corpora, data files, parent models, the prepared data set."""
    parameters: int
    parent: str = ""
    """The registered model it was trained from ("" for one trained from scratch)."""


def stopped_early(job: JobRecord, context: JobContext, what: str = "training") -> str:
    """A run that wrote no final model: the stop the job was asked for, else an error."""
    stop = context.store.stop_requested(job.job_id)
    if not stop:
        raise RuntimeError(f"{what} ended without writing the final model")
    return stop


def register(job: JobRecord, context: JobContext, metrics: dict[str, float] | None, model: NewModel) -> str:
    """Register the job's final model and record it on the job: DONE (or the stop, when `metrics` is None)."""
    if metrics is None:
        return stopped_early(job, context)
    context.store.update(job.job_id, metrics=metrics)
    lineage = Lineage(
        job_id=job.job_id, tokenizer=model.tokenizer, parent=model.parent, datasets=model.datasets, config=job.config
    )
    info = context.registry.register(
        model.name,
        context.artifacts.path(checkpoints.final_dir(job.job_id)),
        model.tokenizer_files,
        lineage,
        metrics,
        model.parameters,
    )
    context.store.update(job.job_id, model=info.ref)
    context.store.log(job.job_id, f"registered model {info.ref}")
    return DONE
