"""Fixtures: a store holding every tiny model, loaded once per session."""

from __future__ import annotations

import pytest
import torch

from libs.common.artifacts import ArtifactStore
from services.inference.engine import LoadedModel, load_model
from tests.helpers.tiny_models import CONFIGS, save_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    for arch in CONFIGS:
        save_model(store, arch)
    return store


@pytest.fixture(scope="session")
def models(store: ArtifactStore) -> dict[str, LoadedModel]:
    return {arch: load_model(f"models/{arch}/1", store) for arch in CONFIGS}
