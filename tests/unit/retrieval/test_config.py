"""The retrieval settings are declared once, with the defaults the dataclass has."""

from __future__ import annotations

from libs.common import config as cfg
from libs.common.settings import VARIABLES
from services.retrieval.config import RetrievalConfig


def test_every_retrieval_variable_is_declared_with_its_default() -> None:
    assert cfg.undeclared(RetrievalConfig, "retrieval") == []
    declared = {name: VARIABLES[name].default for name in cfg.declared_env_names(RetrievalConfig, "retrieval")}
    assert cfg.load(RetrievalConfig, "retrieval", environ=declared) == RetrievalConfig()
