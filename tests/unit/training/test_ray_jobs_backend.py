"""The ray_jobs backend refuses to open without a Ray job server, naming the address it tried."""

from __future__ import annotations

import pytest

from libs.common.errors import Unavailable
from libs.common.ports import free_port
from services.training.backends import BACKENDS, RayJobsBackend
from services.training.config import TrainingConfig


def test_ray_jobs_is_a_backend_and_refuses_an_address_without_a_job_server() -> None:
    assert BACKENDS["ray_jobs"] is RayJobsBackend
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    backend = RayJobsBackend(TrainingConfig(backend="ray_jobs", ray_jobs_address=address), context=None)  # type: ignore[arg-type]
    with pytest.raises(Unavailable) as e:
        backend.open()
    assert e.value.field == "ray_jobs_address" and address in e.value.message
