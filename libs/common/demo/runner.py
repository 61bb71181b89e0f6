"""Runs the main job's stages in order: one progress bar each (with an ETA), a record of what each
stage produced (so a rerun skips what is done), and one clear message when a stage cannot go on.

The record is `demo/<profile>/state.json` in the artifact store:

    {"run_id": "20261201-1450", "profile": "tiny", "stages": {"data": {...results...}, ...},
     "timings": {"data": 12.3, ...}}

A stage is a function `(ctx: StageContext) -> dict` whose result is JSON; it reads earlier stages'
results from `ctx.results`. Its service needs are checked before it starts; any failure inside it
(an RPC error, a failed job, a broken promise of the platform) becomes one `StageStopped` message
naming the stage and what to do, with the traceback kept in $LLMP_HOME/logs/demo.log.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from libs.common.artifacts import ArtifactStore
from libs.common.demo.profiles import Profile
from libs.common.errors import LlmpError
from libs.common.rpc.client import address, health_status

log = logging.getLogger(__name__)


class StageStopped(LlmpError):
    """The run stopped at a stage; the message names it and says what to do."""


class StageError(Exception):
    """Raised inside a stage: what went wrong and what the user can do about it."""

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(what)
        self.what, self.hint = what, hint


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    needs: tuple[str, ...]
    """Services that must be SERVING before the stage starts (the gateway too where the stage goes through it)."""
    run: Callable[[StageContext], dict[str, Any]]


@dataclass
class StageContext:
    console: Console
    profile: Profile
    store: ArtifactStore
    run_id: str
    results: dict[str, dict[str, Any]]
    """Earlier stages' results, by stage key."""
    progress: Progress
    task: TaskID
    notes: list[str] = field(default_factory=list)

    def token(self, key: str) -> str:
        """An idempotency key for a job of this run (a rerun attaches to the same job)."""
        return f"demo-{self.profile.name}-{self.run_id}-{key}"

    def name(self, base: str) -> str:
        """A model/tokeniser/collection name of this profile."""
        return f"demo-{self.profile.name}-{base}"

    def total(self, total: float) -> None:
        self.progress.update(self.task, total=total)

    def advance(self, amount: float = 1.0) -> None:
        self.progress.update(self.task, advance=amount)

    def at(self, completed: float, status: str) -> None:
        self.progress.update(self.task, completed=completed, status=status)

    def status(self, text: str) -> None:
        self.progress.update(self.task, status=text)

    def say(self, text: str) -> None:
        """A line above the bars, kept in the run's record (printed as is: model output may hold brackets)."""
        self.progress.console.print(f"  {text}", markup=False, highlight=False)
        self.notes.append(text)

    def warn(self, text: str) -> None:
        """A line above the bars that must not be missed."""
        self.progress.console.print(f"  {text}", style="bold red", markup=False)
        self.notes.append(text)


class RunState:
    """The run's record in the artifact store: its id and each finished stage's results."""

    def __init__(self, store: ArtifactStore, profile: str) -> None:
        self.path = store.path(f"demo/{profile}/state.json")
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
        self.data.setdefault("profile", profile)
        self.data.setdefault("stages", {})
        self.data.setdefault("timings", {})

    def start(self, fresh: bool) -> None:
        if fresh or "run_id" not in self.data:
            self.data = {"profile": self.data["profile"], "stages": {}, "timings": {}}
            self.data["run_id"] = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            self.save()

    @property
    def run_id(self) -> str:
        return str(self.data["run_id"])

    @property
    def results(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def finish(self, key: str, result: dict[str, Any], seconds: float) -> None:
        self.data["stages"][key] = result
        self.data["timings"][key] = round(seconds, 1)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def check_services(stage: Stage) -> None:
    for service in stage.needs:
        target = address(service)
        state = health_status(target)
        if state != "SERVING":
            raise StageError(
                f"it needs the {service} service, which is {state or 'not answering'} at {target}",
                f"start the stack with `llmp up` (or `llmp up --only {service}`), see `llmp status` and "
                f"$LLMP_HOME/logs/{service}.log, then run `llmp demo` again",
            )


def describe(error: BaseException) -> StageError:
    """One clear line for anything a stage raised."""
    if isinstance(error, StageError):
        return error
    if isinstance(error, grpc.RpcError):
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else str(error)
        if code == grpc.StatusCode.UNAVAILABLE:
            return StageError(f"a service stopped answering ({details})", "check `llmp status`, then rerun `llmp demo`")
        return StageError(
            f"{code.name if code else 'RPC error'}: {details}", "see the service's log in $LLMP_HOME/logs"
        )
    if isinstance(error, LlmpError):
        return StageError(error.message, "")
    return StageError(f"{type(error).__name__}: {error}", "")


class Runner:
    def __init__(self, console: Console, profile: Profile, store: ArtifactStore, log_file: Path) -> None:
        self.console, self.profile, self.store, self.log_file = console, profile, store, log_file
        self.state = RunState(store, profile.name)

    def run(self, stages: list[Stage], fresh: bool) -> RunState:
        self.state.start(fresh)
        self.console.print(
            f"[bold]llmp demo[/] profile [bold]{self.profile.name}[/] ({self.profile.summary}); run {self.state.run_id}"
        )
        progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )
        with progress:
            for n, stage in enumerate(stages, 1):
                label = f"{n}/{len(stages)} {stage.title}"
                if stage.key in self.state.results:
                    progress.console.print(f"[dim]{label}: done earlier (llmp demo --fresh starts over)[/]")
                    continue
                task = progress.add_task(label, total=None, status="")
                ctx = StageContext(
                    self.console, self.profile, self.store, self.state.run_id, self.state.results, progress, task
                )
                started = time.perf_counter()
                result = self._one(stage, ctx, label)
                total = next(t.total for t in progress.tasks if t.id == task) or 1
                progress.update(task, total=total, completed=total)
                progress.update(task, status=f"[green]done[/] in {time.perf_counter() - started:.0f}s")
                self.state.finish(stage.key, {**result, "notes": ctx.notes}, time.perf_counter() - started)
        return self.state

    def _one(self, stage: Stage, ctx: StageContext, label: str) -> dict[str, Any]:
        try:
            check_services(stage)
            return stage.run(ctx)
        except Exception as e:  # every failure becomes one message; the traceback goes to the log
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with self.log_file.open("a") as out:
                out.write(f"--- {datetime.now(UTC).isoformat()} stage {stage.key}\n{traceback.format_exc()}\n")
            error = describe(e)
            hint = error.hint or f"details in {self.log_file}; `llmp demo` resumes from this stage"
            raise StageStopped(
                f"stage '{stage.title}' ({label.split()[0]}) stopped: {error.what}. To do: {hint}"
            ) from None
