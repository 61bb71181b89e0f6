"""gRPC adapter of the training core: proto in -> core call -> proto out, nothing else.

Redis and the tokeniser service are called with blocking clients, so every core call runs in a
worker thread and the event loop keeps serving other calls and watch streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from llmp.training.v1 import training_pb2 as pb
from llmp.training.v1 import training_pb2_grpc as pb_grpc

from libs.common.errors import InvalidArgument
from libs.common.rpc.pools import run_blocking
from libs.common.structs import plain_struct
from services.training.core import TrainingCore
from services.training.jobstore import JobRecord
from services.training.registry import ModelInfo

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingService"].full_name
PROGRESS_FIELDS = set(pb.Progress.DESCRIPTOR.fields_by_name)


def progress_pb(progress: dict[str, Any]) -> pb.Progress:
    known = {k: v for k, v in progress.items() if k in PROGRESS_FIELDS and k != "values"}
    return pb.Progress(**known, values=progress.get("values", {}))


def job_pb(job: JobRecord) -> pb.Job:
    out = pb.Job(
        job_id=job.job_id,
        type=job.type,
        state=pb.Job.State.Value(job.state),
        client_token=job.client_token,
        backend=job.backend,
        reason=job.reason,
        progress=progress_pb(job.progress),
        metrics=job.metrics,
        checkpoint=job.checkpoint,
        model=job.model,
        dataset=job.dataset,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )
    out.config.update(job.config)
    return out


def model_pb(info: ModelInfo) -> pb.Model:
    lineage = pb.Lineage(
        parent=info.lineage.parent,
        datasets=info.lineage.datasets,
        job_id=info.lineage.job_id,
        tokenizer=info.lineage.tokenizer,
    )
    lineage.config.update(info.lineage.config)
    return pb.Model(
        name=info.name,
        version=info.version,
        ref=info.ref,
        path=info.path,
        lineage=lineage,
        metrics=info.metrics,
        files=info.files,
        parameters=info.parameters,
        created_at=info.created_at,
    )


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    #: Methods that may take long (see libs/common/rpc/pools.py).
    SLOW_METHODS = frozenset({"SubmitJob", "WatchJob"})

    def __init__(self, core: TrainingCore) -> None:
        self.core = core

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Any) -> pb.Job:
        config = plain_struct(request.config, "config")
        job = await run_blocking(self.core.submit, request.type, config, request.client_token)
        return job_pb(job)

    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:
        return job_pb(await run_blocking(self.core.get, request.job_id))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        if request.state not in pb.Job.State.values():
            raise InvalidArgument(f"unknown state {request.state}", field="state")
        state = pb.Job.State.Name(request.state) if request.state else ""
        jobs = await run_blocking(self.core.list_jobs, state, request.type, request.limit)
        return pb.ListJobsResponse(jobs=[job_pb(j) for j in jobs])

    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.JobEvent]:
        async for job, event in self.core.watch(request.job_id):
            out = pb.JobEvent(job=job_pb(job))
            if event.kind == "progress":
                out.progress.CopyFrom(progress_pb(event.data))
            elif event.kind == "log":
                out.log = event.data
            yield out

    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.Job:
        return job_pb(await run_blocking(self.core.cancel, request.job_id))

    async def ResumeJob(self, request: pb.ResumeJobRequest, context: Any) -> pb.Job:
        return job_pb(await run_blocking(self.core.resume, request.job_id))

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        models = await run_blocking(self.core.list_models, request.prefix)
        return pb.ListModelsResponse(models=[model_pb(m) for m in models])

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.Model:
        return model_pb(await run_blocking(self.core.get_model, request.model))
