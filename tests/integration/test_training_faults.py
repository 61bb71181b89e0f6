"""Faults of the training service, over the real parts: Redis, the tokeniser service, Ray, gRPC.

A Ray Train worker killed and Redis restarted in the middle of one job, and the ray_jobs backend
submitting a job's driver to a separate Ray head through Ray's job submission API, on the
session's training stack (tests/helpers/training_stack.py). The restart of the control plane
and cancel are in test_training_service.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from llmp.training.v1 import training_pb2 as pb

from libs.common.clients.training import TrainingClient
from libs.common.local_ray import local_ray_env, make_ray_temp_dir
from libs.common.ports import free_port
from tests.helpers.services import start_service
from tests.helpers.training_stack import TINY, WATCH_TIMEOUT_S, Stack, follow_until, train_workers

pytestmark = pytest.mark.integration

MAX_STEPS, CHECKPOINT_EVERY = 40, 10
FAULTY = {**TINY, "max_steps": MAX_STEPS, "checkpoint_every": CHECKPOINT_EVERY, "warmup_steps": 5, "log_every": 5}


def run_to_end(client: TrainingClient, job_id: str) -> tuple[pb.Job, list[str]]:
    logs = [event.log for event in client.watch(job_id, timeout=WATCH_TIMEOUT_S) if event.log]
    return client.get(job_id), logs


def test_a_killed_worker_and_a_redis_restart_mid_job_lose_nothing_acknowledged(stack: Stack) -> None:
    job = stack.client.submit("pretrain", {**FAULTY, "model_name": "tiny-faults"}, client_token="faults-a")
    follow_until(stack.client, job.job_id, "checkpoint checkpoints/")
    at_kill = stack.client.get(job.job_id)
    workers = train_workers(stack.training.proc.pid)
    assert len(workers) == FAULTY["num_workers"], [w.cmdline() for w in workers]
    workers[0].send_signal(signal.SIGKILL)

    # Redis restarts while Ray Train brings the worker group back
    acknowledged = {j.job_id: j.state for j in stack.client.list_jobs()}
    stack.redis.restart()
    after = {j.job_id: j for j in stack.client.list_jobs()}
    assert set(acknowledged) <= set(after)
    for job_id, state in acknowledged.items():
        if state in (pb.Job.SUCCEEDED, pb.Job.FAILED, pb.Job.CANCELLED):
            assert after[job_id].state == state  # finished jobs stay as they were
    # the client token still names the same job after the restart
    assert stack.client.submit("pretrain", {**FAULTY, "model_name": "tiny-faults"}, "faults-a").job_id == job.job_id

    final, logs = run_to_end(stack.client, job.job_id)
    assert final.state == pb.Job.SUCCEEDED, f"{final.reason}\n{stack.training.output()[-3000:]}"
    resumed = [line for line in logs if line.startswith("resumed from checkpoints/")]
    assert resumed, logs
    step = int(resumed[-1].rsplit(" ", 1)[1])
    # a checkpoint at least as recent as the one the kill followed: at most one interval is lost
    assert step >= at_kill.progress.step - CHECKPOINT_EVERY, (step, at_kill.progress.step)
    assert step % CHECKPOINT_EVERY == 0 and step > 0
    assert final.progress.step == MAX_STEPS and final.model == "tiny-faults:1"


# Ray reads RAY_AUTH_MODE once, at import: the head runs with token authentication and its clients
# are started with its token in their environment, as the local stack starts its Ray and services.
LIST_SUBMISSIONS = """
import json, sys
from ray.job_submission import JobSubmissionClient
jobs = JobSubmissionClient(sys.argv[1]).list_jobs()
print(json.dumps([{"id": j.submission_id, "status": str(j.status.value), "meta": j.metadata or {}} for j in jobs]))
"""


def submissions(url: str, ray_env: dict[str, str]) -> list[dict[str, Any]] | None:
    """The job server's submissions, or None while it does not answer."""
    done = subprocess.run(
        [sys.executable, "-c", LIST_SUBMISSIONS, url], env={**os.environ, **ray_env}, capture_output=True, text=True
    )
    return json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else None


class RayHead:
    """A Ray head with its job server, in the foreground so that SIGTERM stops it (never `ray stop`)."""

    def __init__(self, home: Path) -> None:
        self.port, self.dashboard_port = free_port(), free_port()
        self.log = home / "ray-head.log"
        self.env = local_ray_env(home)  # token authentication with $LLMP_HOME's token, loopback only
        argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats"]
        argv += ["--node-ip-address=127.0.0.1", f"--port={self.port}", "--num-cpus=2"]
        argv += [f"--temp-dir={make_ray_temp_dir(home)}", f"--ray-client-server-port={free_port()}"]
        argv += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        # the agent's HTTP port is fixed (52365) by default: taken by any other Ray on this machine,
        # its job server then answers "No available agent"
        argv += [f"--dashboard-agent-listen-port={free_port()}"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **self.env}
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_job_server(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            with socket.socket() as s:
                s.settimeout(0.5)
                listening = s.connect_ex(("127.0.0.1", self.dashboard_port)) == 0
            if listening and submissions(self.url, self.env) is not None:  # it listens before its job module is up
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)


def driver_end(url: str, ray_env: dict[str, str], job_id: str, timeout: float = 120) -> list[str]:
    """The statuses of the job's drivers once none is pending or running (each exits just after
    recording the job's end in Redis)."""
    end = time.monotonic() + timeout
    while True:
        found = [j["status"] for j in submissions(url, ray_env) or [] if j["meta"].get("llmp_job_id") == job_id]
        if found and not {"PENDING", "RUNNING"} & set(found):
            return found
        assert time.monotonic() < end, f"drivers of {job_id}: {found}"
        time.sleep(0.5)


def test_the_ray_jobs_backend_runs_a_job_through_job_submission(stack: Stack) -> None:
    head = RayHead(stack.home)
    try:
        if not head.wait_job_server(180):
            pytest.skip(f"the Ray job server did not start here:\n{head.log.read_text(errors='replace')[-2000:]}")
        env = {
            "LLMP_REDIS_URL": stack.redis.url,
            "LLMP_TOKENIZER_ADDRESS": stack.tokenizer.address,
            "LLMP_TRAINING_BACKEND": "ray_jobs",
            "LLMP_TRAINING_RAY_JOBS_ADDRESS": head.url,
            **head.env,
        }
        service = start_service("training", stack.home, extra_env=env)
        try:
            client = TrainingClient(service.address)
            config = {**TINY, "max_steps": 10, "checkpoint_every": 5, "num_workers": 1, "model_name": "tiny-rayjobs"}
            job = client.submit("pretrain", config)
            final = client.wait(job.job_id, timeout=WATCH_TIMEOUT_S)
            assert final.state == pb.Job.SUCCEEDED, f"{final.reason}\n{service.output()[-3000:]}"
            assert final.model == "tiny-rayjobs:1"

            # one driver, run by the head's job server
            assert driver_end(head.url, head.env, job.job_id) == ["SUCCEEDED"]
        finally:
            service.stop()
    finally:
        head.stop()
