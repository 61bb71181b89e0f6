from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument, NotFound
from services.inference.engine import load_model
from tests.helpers.tiny_models import CONFIGS


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_loads_every_supported_architecture(models, arch: str) -> None:
    loaded = models[arch]
    assert loaded.config.model_type == arch
    assert not loaded.module.training
    assert all(not p.requires_grad for p in loaded.module.parameters())


def test_loads_the_saved_weights(store: ArtifactStore, models) -> None:
    from safetensors.torch import load_file

    saved = load_file(store.root / "models/llama/1/model.safetensors")
    state = models["llama"].module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_gpt2_ties_its_head_to_the_embedding(models) -> None:
    module = models["gpt2"].module
    assert module.lm_head.weight.data_ptr() == module.transformer.wte.weight.data_ptr()


def test_absolute_path_inside_the_store_and_dtype(store: ArtifactStore) -> None:
    loaded = load_model(store.root / "models/llama/1", store, dtype="bfloat16")
    assert next(loaded.module.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("location", ["../outside", "models/../../x", "/etc"])
def test_refuses_paths_that_leave_the_store(store: ArtifactStore, location: str) -> None:
    with pytest.raises(InvalidArgument):
        load_model(location, store)


def test_refuses_a_symlink_out_of_the_store(store: ArtifactStore, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    shutil.copytree(store.root / "models/llama/1", outside)
    os.symlink(outside, store.root / "models/escape")
    with pytest.raises(InvalidArgument):
        load_model("models/escape", store)


def test_missing_model_and_missing_weights(store: ArtifactStore) -> None:
    with pytest.raises(NotFound):
        load_model("models/nothing", store)
    pickled_only = store.root / "models/pickled"
    pickled_only.mkdir()
    shutil.copy(store.root / "models/llama/1/config.json", pickled_only)
    (pickled_only / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(NotFound, match="safetensors"):
        load_model("models/pickled", store)


def test_refuses_unsupported_architectures_and_bad_dtypes(store: ArtifactStore) -> None:
    odd = store.root / "models/odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"x": "remote.Code"}}))
    with pytest.raises(InvalidArgument, match="model_type"):
        load_model("models/odd", store)
    with pytest.raises(InvalidArgument, match="dtype"):
        load_model("models/llama/1", store, dtype="float8")


def test_refuses_weights_that_do_not_match_the_config(store: ArtifactStore) -> None:
    wrong = store.root / "models/wrong"
    shutil.copytree(store.root / "models/gpt_neox/1", wrong)
    shutil.copy(store.root / "models/llama/1/config.json", wrong)
    with pytest.raises(InvalidArgument, match="do not match"):
        load_model("models/wrong", store)
