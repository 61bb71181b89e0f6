"""Client of the training service (`llmp.training.v1`).

client = TrainingClient()                       # LLMP_TRAINING_ADDRESS
job = client.submit("pretrain", {"tokenizer": "code", "corpus": ["stdlib"], "model_name": "tiny"})
for event in client.watch(job.job_id):          # progress, log lines and state changes until it ends
    print(event.job.state, event.progress.loss, event.log)
model = client.model("tiny:latest")
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from llmp.training.v1 import training_pb2 as pb
from llmp.training.v1 import training_pb2_grpc as pb_grpc

from libs.common.rpc.client import address, channel
from libs.common.structs import to_struct


class TrainingClient:
    def __init__(self, target: str | None = None, ch: grpc.Channel | None = None) -> None:
        self.channel = ch or channel(target or address("training"))
        self.stub = pb_grpc.TrainingServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def submit(self, job_type: str, config: dict[str, Any], client_token: str = "") -> pb.Job:
        request = pb.SubmitJobRequest(type=job_type, config=to_struct(config), client_token=client_token)
        return self.stub.SubmitJob(request)

    def get(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id))

    def list_jobs(self, state: str = "", job_type: str = "", limit: int = 0) -> list[pb.Job]:
        request = pb.ListJobsRequest(state=pb.Job.State.Value(state) if state else 0, type=job_type, limit=limit)
        return list(self.stub.ListJobs(request).jobs)

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """The job's events from its first until it ends (DEADLINE_EXCEEDED after `timeout` seconds)."""
        return iter(self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout))

    def wait(self, job_id: str, timeout: float | None = None) -> pb.Job:
        """Follow the job to its end; returns its final state."""
        final = self.get(job_id)
        for event in self.watch(job_id, timeout):
            final = event.job
        return final

    def cancel(self, job_id: str) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id))

    def resume(self, job_id: str) -> pb.Job:
        return self.stub.ResumeJob(pb.ResumeJobRequest(job_id=job_id))

    def models(self, prefix: str = "") -> list[pb.Model]:
        return list(self.stub.ListModels(pb.ListModelsRequest(prefix=prefix)).models)

    def model(self, ref: str) -> pb.Model:
        return self.stub.GetModel(pb.GetModelRequest(model=ref))
