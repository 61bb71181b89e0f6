"""`llmp demo --profile tiny` end to end on a real local stack, and the report it leaves.

The run starts without the gateway, the only way the demo generates and answers, so it must stop
at the serving stage with one clear message (no traceback) and keep what it finished; once the
gateway is up, a second `llmp demo` goes on from there. The report is then checked for what the platform promises:
losses fall in every training stage, greedy speculative decoding equals plain decoding, the INT8
model's held-out perplexity is within 2% of fp32, retrieval beats chance, every RAG answer cites
a retrieved chunk, and every picture exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from libs.common.ports import free_port
from tests.helpers.services import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIGURES = ("funnel", "tokenisers", "loss_curves", "planner", "throughput", "speculative", "quantisation", "recall")
TRAINING = ("sweep", "pretrain", "distill", "sft", "reward", "ppo", "dpo")
SERVICES = ("tokenizer", "retrieval", "training", "inference", "gateway")


def distinct_ports(n: int) -> list[int]:
    """n free ports, no two alike (the kernel may hand a released port out again)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def stack_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "LLMP_HOME": str(tmp_path / "home"), "HOME": str(tmp_path / "user"), "COLUMNS": "200"}
    names = [f"LLMP_{s.upper()}_{kind}" for s in SERVICES for kind in ("PORT", "METRICS_PORT")]
    names += ["LLMP_GATEWAY_HTTP_PORT", "LLMP_REDIS_PORT", "LLMP_RAY_PORT", "LLMP_RAY_DASHBOARD_PORT"]
    env |= {name: str(port) for name, port in zip(names, distinct_ports(len(names)), strict=True)}
    return env


def llmp(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", "from libs.common.cli import main; main()", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def falls(curve: list[list[float]]) -> bool:
    """The mean loss of the last third of the logged steps is below that of the first third."""
    losses = [loss for _, loss in curve]
    third = max(1, len(losses) // 3)
    return len(losses) >= 2 and sum(losses[-third:]) / third < sum(losses[:third]) / third


@pytest.mark.timeout(3000)
def test_demo_tiny_profile_end_to_end(tmp_path: Path) -> None:
    env = stack_env(tmp_path)
    (tmp_path / "user").mkdir()
    try:
        without_gateway = [arg for s in SERVICES if s != "gateway" for arg in ("--only", s)]
        llmp(env, "up", *without_gateway, "--timeout", "300")
        stopped = llmp(env, "demo", "--profile", "tiny", check=False)
        said = stopped.stdout + stopped.stderr
        assert stopped.returncode == 2, said
        assert "stage 'serving'" in said and "gateway service" in said and "llmp up" in said, said
        assert "Traceback" not in said

        llmp(env, "up", "--timeout", "300")
        finished = llmp(env, "demo", "--profile", "tiny").stdout
        for kept in ("data preparation", "tokenisers", "plan, pretrain, distil", "alignment"):
            assert f"{kept}: done earlier" in finished, finished
        again = llmp(env, "demo", "--profile", "tiny").stdout
        assert again.count("done earlier") == 6, again
    finally:
        llmp(env, "down", check=False)

    (page,) = (tmp_path / "home" / "artifacts" / "demo" / "tiny" / "runs").glob("*/report.html")
    figures = json.loads((page.parent / "figures.json").read_text())
    results = json.loads((page.parent / "results.json").read_text())["stages"]
    for name in FIGURES:
        assert (page.parent / figures[name]["png"]).stat().st_size > 1000, name
        assert figures[name]["png"] in page.read_text()

    curves = figures["loss_curves"]["data"]["curves"]
    assert sorted(curves) == sorted(TRAINING)
    for stage, curve in curves.items():
        # PPO's logged loss is its clipped surrogate plus the value loss, on fresh samples each step: no trend to expect
        assert stage == "ppo" or falls(curve), f"{stage}: {curve}"

    serving = results["serving"]
    assert serving["decoding"]["served"]["drafted"] > 0 and serving["decoding"]["pretrained_draft"]["drafted"] > 0
    assert serving["decoding"]["int8"]["tokens"] == serving["decoding"]["served"]["tokens"] > 0
    assert all(d["greedy_equal"] for d in serving["drafting"].values()), "speculative must equal plain INT8 output"
    assert serving["front_door"].startswith("http://127.0.0.1:")
    assert abs(serving["perplexity"]["int8"] / serving["perplexity"]["fp32"] - 1) <= 0.02, serving["perplexity"]
    assert serving["memory_bytes_per_parameter"]["int8"] < serving["memory_bytes_per_parameter"]["fp32"]
    assert all(chat["answer"] for chat in serving["chats"])

    rag = results["retrieval"]
    assert rag["recall"] > rag["chance"], rag
    assert rag["answers"] and all(a["citations"] and a["cites_retrieved"] for a in rag["answers"]), rag["answers"]

    steps = results["alignment"]["steps"]
    assert steps["ppo"]["before_after"]["eval_reward"][0] is not None, steps["ppo"]
    assert steps["ppo"]["before_after"]["eval_kl"][1] > 0, "the policy moved away from the SFT model"
    assert steps["reward"]["before_after"]["eval_accuracy"][1] is not None, steps["reward"]

    funnel = results["data"]["funnel"]
    assert [row["stage"] for row in funnel][1:6] == ["normalize", "exact_dedup", "near_dedup", "quality", "pii"]
    assert all(row["docs_out"] <= row["docs_in"] for row in funnel)


def test_demo_without_a_stack_stops_with_one_message(tmp_path: Path) -> None:
    env = stack_env(tmp_path)
    result = llmp(env, "demo", "--profile", "tiny", check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert "stage 'data preparation'" in said and "tokenizer service" in said and "llmp up" in said, said
    assert "Traceback" not in said
    state = json.loads((tmp_path / "home" / "artifacts" / "demo" / "tiny" / "state.json").read_text())
    assert state["stages"] == {}, "a stopped stage records nothing"
