"""The training service's settings: every LLMP_TRAINING_* variable is declared, with the same defaults."""

from __future__ import annotations

from libs.common import config as cfg
from libs.common.settings import VARIABLES
from services.training.config import TrainingConfig


def test_every_variable_is_declared_with_the_dataclass_default() -> None:
    assert cfg.undeclared(TrainingConfig, "training") == []
    declared = {name: VARIABLES[name].default for name in cfg.declared_env_names(TrainingConfig, "training")}
    assert cfg.load(TrainingConfig, "training", environ=declared) == TrainingConfig()
