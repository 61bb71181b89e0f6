"""`llmp up` / `status` / `down` and the tokenizer commands, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from libs.common import secrets
from libs.common.ports import free_port
from tests.helpers.services import ROOT

pytestmark = pytest.mark.e2e


def llmp(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", "from libs.common.cli import main; main()", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_stack_up_use_and_down(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LLMP_HOME": str(tmp_path / "home"),
        "LLMP_TOKENIZER_PORT": str(free_port()),
        "LLMP_TOKENIZER_METRICS_PORT": str(free_port()),
        "LLMP_REDIS_PORT": str(free_port()),
        "COLUMNS": "200",
    }
    try:
        up = llmp(env, "up", "--only", "tokenizer")
        assert "tokenizer" in up and "SERVING" in up
        password = secrets.read(tmp_path / "home", secrets.REDIS_PASSWORD)
        assert redis.Redis(port=int(env["LLMP_REDIS_PORT"]), password=password).ping()
        status = llmp(env, "status")
        assert status.count("SERVING") == 1 and "RUNNING" in status

        docs = tmp_path / "doc.txt"
        docs.write_text("The transformer architecture revolutionised natural language processing.\n" * 50)
        llmp(env, "tokenizer", "upload", "docs", str(docs), "--pydoc")
        assert "trained cli:1" in llmp(env, "tokenizer", "train", "cli", "-a", "bpe", "-v", "500", "-c", "docs")
        assert "tokens for 23 characters" in llmp(env, "tokenizer", "encode", "cli", "Tokenisers split words.")
        assert "cli:1" in llmp(env, "tokenizer", "list")
        described = llmp(env, "tokenizer", "describe", "cli")
        assert "algorithm" in described and "bpe" in described and "500" in described

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{env['LLMP_TOKENIZER_METRICS_PORT']}/metrics").read()
        assert b'llmp_serving{service="tokenizer"} 1.0' in metrics
        assert b'llmp_grpc_requests_total{code="OK",method="Train",service="tokenizer"} 1.0' in metrics
    finally:
        down = llmp(env, "down")
    assert "tokenizer" in down and "redis" in down
    pids = [json.loads(p.read_text())["pid"] for p in (tmp_path / "home" / "run").glob("*.json")]
    assert pids == [], "down removes every pid file"
    assert "STOPPED" in llmp(env, "status")
