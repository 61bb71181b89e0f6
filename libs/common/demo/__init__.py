"""The main job (`llmp demo`): everything the platform does, end to end, on the running stack.

    llmp up && llmp demo                # the quick profile (~15 minutes on two cores)
    llmp demo --profile tiny            # minutes: what the end-to-end test runs
    llmp demo --profile full            # larger models, longer training
    llmp demo --fresh                   # start over (otherwise finished stages are kept)
    llmp demo --open                    # serve the report on 127.0.0.1 when done

Stages (STAGES, in order): data preparation, tokenisers, scaling plan + pretraining +
distillation, alignment, serving (INT8, speculative decoding, chat through the gateway), retrieval
(recall, RAG answers with citations), and the report (HTML with pictures, and the figures as JSON,
in the artifact store under demo/<profile>/runs/<run id>/).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from libs.common import config as cfg
from libs.common.artifacts import ArtifactStore
from libs.common.config import CommonConfig
from libs.common.demo import data_stages, report, serve_stages, train_stages
from libs.common.demo.profiles import profile
from libs.common.demo.runner import Runner, Stage

STAGES: list[Stage] = [
    Stage("data", "data preparation", ("tokenizer", "training"), data_stages.data_preparation),
    Stage("tokenisers", "tokenisers", ("tokenizer",), data_stages.tokenisers),
    Stage("pretraining", "plan, pretrain, distil", ("tokenizer", "training"), train_stages.pretraining),
    Stage("alignment", "alignment", ("training",), train_stages.alignment),
    Stage("serving", "serving", ("training", "tokenizer", "inference", "gateway"), serve_stages.serving),
    Stage("retrieval", "retrieval and RAG", ("retrieval", "tokenizer", "inference", "gateway"), serve_stages.retrieval),
]


def run(console: Console, profile_name: str = "quick", fresh: bool = False) -> Path:
    """Run (or resume) the main job; returns the report page's path."""
    common = cfg.load(CommonConfig, "common")
    store = ArtifactStore(common.artifacts_path)
    runner = Runner(console, profile(profile_name), store, common.home_path / "logs" / "demo.log")
    state = runner.run(STAGES, fresh)
    page = report.write(store.path(f"demo/{profile_name}/runs/{state.run_id}"), state.data)
    console.rule("summary")
    for line in report.summary(state.data):
        console.print(f"  {line}")
    console.print(f"report: [bold]{page}[/] (figures as JSON beside it: figures.json)")
    return page


def serve_report(console: Console, page: Path) -> None:
    """Serve the report's folder on 127.0.0.1 until interrupted."""
    import contextlib
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(page.parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        console.print(f"serving the report at http://127.0.0.1:{server.server_address[1]}/{page.name} (Ctrl-C stops)")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
