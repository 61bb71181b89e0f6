"""Choosing where a corpus ingest runs, and refusing what cannot run."""

from __future__ import annotations

import pytest

from libs.common.errors import FailedPrecondition, InvalidArgument
from services.retrieval.config import RetrievalConfig
from services.retrieval.corpus import choose_engine


def test_auto_uses_ray_data_only_for_large_corpora_on_a_joined_ray() -> None:
    config = RetrievalConfig(ray_min_documents=100)
    assert choose_engine("auto", 99, config, ray_joined=True) == "local"
    assert choose_engine("", 100, config, ray_joined=True) == "ray"
    assert choose_engine("auto", 10_000, config, ray_joined=False) == "local"
    assert choose_engine("local", 10_000, config, ray_joined=True) == "local"


def test_ray_without_a_ray_and_unknown_engines_are_refused() -> None:
    with pytest.raises(FailedPrecondition):
        choose_engine("ray", 1, RetrievalConfig(), ray_joined=False)
    with pytest.raises(InvalidArgument) as e:
        choose_engine("spark", 1, RetrievalConfig(), ray_joined=True)
    assert e.value.field == "engine"
