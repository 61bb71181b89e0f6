"""The training service's test stack, shared by every training integration module of a session.

Redis, the tokeniser service (with a byte-level BPE and a WordPiece tokeniser trained on
`pydoc_data.topics`) and the training service, sharing one LLMP_HOME; started once, because most
of what it costs is starting Ray and its processes. Model names carry their module's prefix, so
the modules can share the registry; `base` is a tiny Llama pretrained once for the modules that
start from a trained causal LM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import torch
from llmp.training.v1 import training_pb2 as pb

from libs.common import corpora
from libs.common.clients.tokenizer import TokenizerClient
from libs.common.clients.training import TrainingClient
from tests.helpers.redis_server import RedisServer
from tests.helpers.services import ServiceProcess, start_service

WATCH_TIMEOUT_S = 900  # a watch that outlives this fails the test instead of hanging it
GPU = torch.cuda.is_available()
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

TINY = {
    "tokenizer": "topics-bpe",
    "corpus": ["topics"],
    "model_name": "tiny-topics",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "seq_len": 64,
    "micro_batch_size": 8,
    "grad_accum_steps": 2,
    "max_steps": 40,
    "learning_rate": 0.003,
    "warmup_steps": 5,
    "log_every": 5,
    "checkpoint_every": 20,
    "num_workers": 2,
}
BASE = {**TINY, "model_name": "base", "seq_len": 128, "num_workers": 1, "max_steps": 40, "checkpoint_every": 40}
"""The shared causal LM: alignment starts from it, distillation uses it as the target."""


class Stack:
    """Redis, the tokeniser service and the training service, sharing one LLMP_HOME.

    `training_env` is added to the training service's environment (e.g. more Ray CPUs).
    """

    def __init__(self, home: Path, training_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.training_env = training_env or {}
        self.redis = RedisServer(home / "redis")
        (home / "redis").mkdir()
        self.redis.start()
        self.tokenizer = start_service("tokenizer", home)
        tokenizers = TokenizerClient(self.tokenizer.address)
        tokenizers.upload("topics", [text for _, text in corpora.pydoc_topics()])
        for name, algorithm, options in (
            ("topics-bpe", "byte_level_bpe", {}),
            ("topics-wp", "wordpiece", {"special_tokens": WORDPIECE_SPECIALS}),
        ):
            trained = tokenizers.train(name, algorithm, 1000, corpus=["topics"], **options)
            assert trained.state == trained.SUCCEEDED, trained.error
        self.training = self._start_training()
        self.client = TrainingClient(self.training.address)
        self._base: pb.Job | None = None

    def _start_training(self) -> ServiceProcess:
        env = {
            "LLMP_REDIS_URL": self.redis.url,
            "LLMP_TOKENIZER_ADDRESS": self.tokenizer.address,
            "LLMP_TRAINING_RAY_NUM_CPUS": "2",
            "LLMP_TRAINING_RAY_DASHBOARD": "false",
            "LLMP_TRAINING_DRAIN_SECONDS": "20",
            "RAY_gcs_server_port_wait_time_s": "180",  # a loaded 2-core machine starts Ray slowly
            **self.training_env,
        }
        return start_service("training", self.home, extra_env=env)

    def restart_training(self) -> None:
        assert self.training.stop() == 0, self.training.output()
        self.training = self._start_training()
        self.client = TrainingClient(self.training.address)

    def base(self) -> pb.Job:
        """The shared base model's finished job, trained on first use."""
        if self._base is None:
            self._base = run_to_end(self, "pretrain", BASE)[0]
        return self._base

    def close(self) -> None:
        self.training.stop()
        self.tokenizer.stop()
        self.redis.stop()


def run_to_end(stack: Stack, job_type: str, config: dict[str, Any]) -> tuple[pb.Job, list[pb.Progress]]:
    """Submit a job and follow its watch stream to the end: the finished job and its progress reports."""
    job = stack.client.submit(job_type, config)
    progress = [e.progress for e in stack.client.watch(job.job_id, timeout=WATCH_TIMEOUT_S) if e.HasField("progress")]
    final = stack.client.get(job.job_id)
    assert final.state == pb.Job.SUCCEEDED, f"{final.reason}\n{stack.training.output()[-3000:]}"
    assert final.progress.step == final.progress.total_steps and final.progress.tokens_per_second > 0
    print(f"{job_type} loss curve: {[round(p.loss, 3) for p in progress]}; metrics {dict(final.metrics)}")
    return final, progress


def refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(*args)
    return e.value


def follow_until(client: TrainingClient, job_id: str, seen: str, after: str | None = None) -> pb.Job:
    """Read the job's events until a log line containing `seen` (after one containing `after`, if given);
    returns the job at that point."""
    events = client.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=WATCH_TIMEOUT_S)
    for event in events:
        if after is not None:
            after = None if after in event.log else after
            continue
        assert event.job.state in (pb.Job.PENDING, pb.Job.RUNNING), event.job.reason
        if seen in event.log:
            events.cancel()
            return event.job
    raise AssertionError(f"the job ended before logging {seen!r}")


def train_workers(service_pid: int) -> list[psutil.Process]:
    """The Ray Train worker processes under the service (its local Ray is its child)."""
    found = []
    for proc in psutil.Process(service_pid).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found
