"""`llmp train`'s job configs: a file and KEY=VALUE pairs, values read as YAML."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from libs.common.cli.training import parse_config


def test_pairs_are_typed_and_win_over_the_file(tmp_path: Path) -> None:
    file = tmp_path / "job.yaml"
    file.write_text("tokenizer: code\nmax_steps: 100\nlora: {rank: 8}\n")
    config = parse_config(file, ["max_steps=500", "corpus=[stdlib, topics]", "learning_rate=3e-4", "tie=true", "x="])
    assert config == {
        "tokenizer": "code",
        "max_steps": 500,
        "lora": {"rank": 8},
        "corpus": ["stdlib", "topics"],
        "learning_rate": 3e-4,
        "tie": True,
        "x": "",
    }


def test_malformed_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(click.BadParameter):
        parse_config(None, ["max_steps"])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(click.BadParameter):
        parse_config(listing, [])
