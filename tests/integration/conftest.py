"""Fixtures shared by the integration modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.training_stack import GPU, Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The training stack, started by the first training module that asks and kept to the session's end.
    The service offers GPU workers only where there is one."""
    stack = Stack(tmp_path_factory.mktemp("llmp"), training_env={"LLMP_TRAINING_WORKER_GPUS": "1"} if GPU else {})
    yield stack
    stack.close()
