"""The main job's runner: stages in order, a rerun skips finished ones, --fresh starts over, and a
failing stage stops the run with one message naming it (its traceback in the log, nothing recorded)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from rich.console import Console

from libs.common.artifacts import ArtifactStore
from libs.common.demo import STAGES
from libs.common.demo.profiles import PROFILES, profile
from libs.common.demo.runner import Runner, Stage, StageContext, StageError, StageStopped
from libs.common.errors import InvalidArgument


class Unreachable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


def runner(tmp_path: Path) -> Runner:
    console = Console(file=open(tmp_path / "out.txt", "w"), width=200)  # noqa: SIM115 - closed with the test
    return Runner(console, profile("tiny"), ArtifactStore(tmp_path / "store"), tmp_path / "logs" / "demo.log")


def recording(calls: list[str], key: str, result: dict[str, Any] | None = None) -> Stage:
    def run(ctx: StageContext) -> dict[str, Any]:
        calls.append(key)
        ctx.total(2)
        ctx.advance()
        ctx.say(f"{key} ran")
        return {"seen": sorted(ctx.results), **(result or {})}

    return Stage(key, f"stage {key}", (), run)


def test_stages_run_in_order_and_a_rerun_skips_finished_ones(tmp_path: Path) -> None:
    calls: list[str] = []
    stages = [recording(calls, "a", {"x": 1}), recording(calls, "b")]
    state = runner(tmp_path).run(stages, fresh=False)
    assert calls == ["a", "b"]
    assert state.results["b"]["seen"] == ["a"] and state.results["a"]["x"] == 1
    assert state.results["a"]["notes"] == ["a ran"]
    first_run = state.run_id

    again = runner(tmp_path).run(stages, fresh=False)
    assert calls == ["a", "b"], "finished stages are not run again"
    assert again.run_id == first_run

    runner(tmp_path).run(stages, fresh=True)
    assert calls == ["a", "b", "a", "b"]


def test_a_failing_stage_stops_the_run_with_one_message_and_keeps_earlier_stages(tmp_path: Path) -> None:
    calls: list[str] = []

    def broken(ctx: StageContext) -> dict[str, Any]:
        raise Unreachable()

    stages = [recording(calls, "a"), Stage("b", "serving", (), broken), recording(calls, "c")]
    with pytest.raises(StageStopped) as stopped:
        runner(tmp_path).run(stages, fresh=False)
    message = stopped.value.message
    assert "stage 'serving' (2/3) stopped" in message and "connection refused" in message and "llmp status" in message
    assert calls == ["a"]
    state = json.loads((tmp_path / "store" / "demo" / "tiny" / "state.json").read_text())
    assert sorted(state["stages"]) == ["a"]
    assert "Unreachable" in (tmp_path / "logs" / "demo.log").read_text(), "the traceback goes to the log"

    stages[1] = recording(calls, "b")
    runner(tmp_path).run(stages, fresh=False)
    assert calls == ["a", "b", "c"], "the rerun resumes at the stage that stopped"


def test_a_stage_whose_service_is_down_does_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from libs.common.stack import free_port

    monkeypatch.setenv("LLMP_INFERENCE_ADDRESS", f"127.0.0.1:{free_port()}")
    calls: list[str] = []
    stage = recording(calls, "serve")
    with pytest.raises(StageStopped) as stopped:
        runner(tmp_path).run([Stage("serve", "serving", ("inference",), stage.run)], fresh=False)
    assert "needs the inference service" in stopped.value.message and "llmp up" in stopped.value.message
    assert calls == []


def test_stage_errors_keep_their_hint(tmp_path: Path) -> None:
    def refused(ctx: StageContext) -> dict[str, Any]:
        raise StageError("the job failed", "see `llmp train get x`")

    with pytest.raises(StageStopped, match=re.escape("the job failed. To do: see `llmp train get x`")):
        runner(tmp_path).run([Stage("a", "alignment", (), refused)], fresh=False)


def test_profiles_and_stage_list() -> None:
    assert list(PROFILES) == ["tiny", "quick", "full"]
    assert [s.key for s in STAGES] == ["data", "tokenisers", "pretraining", "alignment", "serving", "retrieval"]
    for p in PROFILES.values():
        assert len(p.ladder) >= 3 and p.target["hidden_size"] % p.target["num_heads"] == 0
        assert p.align_length <= p.seq_len, "alignment examples must fit the pretrained context"
    with pytest.raises(InvalidArgument, match="profile"):
        profile("huge")
