"""Shared fixtures: a temporary LLMP_HOME, a real tokeniser service; hardware markers (helpers: tests/helpers)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.services import ServiceProcess, start_service


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    no_kind = pytest.mark.skip(reason="needs Docker and kind; not available on this machine")
    has_kind = (
        bool(shutil.which("kind")) and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
        if shutil.which("docker")
        else False
    )
    for item in items:
        if "gpu" in item.keywords and not _has_gpu():
            item.add_marker(no_gpu)
        if "kind" in item.keywords and not has_kind:
            item.add_marker(no_kind)


@pytest.fixture
def llmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "llmp"
    home.mkdir()
    monkeypatch.setenv("LLMP_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def tokenizer_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = start_service("tokenizer", tmp_path_factory.mktemp("llmp"))
    yield service
    service.stop()
