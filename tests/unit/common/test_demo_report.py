"""The main job's report: every figure drawn (PNG) and kept as data (figures.json), one HTML page that
shows them, and a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from libs.common.demo import report


def job(curve: list[list[float]], **metrics: float) -> dict[str, Any]:
    return {"job_id": "j", "model": "m:1", "dataset": "", "metrics": metrics, "curve": curve, "seconds": 1.0}


def state(front_door: str = "http://127.0.0.1:8000") -> dict[str, Any]:
    falling = [[1, 3.0], [2, 2.5], [3, 2.0]]
    decoding = {"tokens_per_second": 50.0, "latencies": [0.5, 0.6], "tokens": 32, "drafted": 40, "accepted": 30,
                "acceptance": 0.75}  # fmt: skip
    return {
        "profile": "tiny",
        "run_id": "r1",
        "timings": {"data": 3.0, "serving": 5.0},
        "stages": {
            "data": {"funnel": [{"stage": "read", "docs_in": 10, "docs_out": 10, "changed": 0, "detail": ""},
                                {"stage": "pii", "docs_in": 10, "docs_out": 8, "changed": 2, "detail": "EMAIL 2"}]},
            "tokenisers": {"compared": [{"algorithm": "bpe", "count": 12}, {"algorithm": "unigram", "count": 15}],
                           "vocab_report": [{"vocab_size": 500, "chars_per_token": 2.0, "embedding_params": 2e6},
                                            {"vocab_size": 1000, "chars_per_token": 2.5, "embedding_params": 4e6}]},
            "pretraining": {
                "sweep": job(falling), "pretrain": job(falling, eval_loss=2.0),
                "distill": job(falling, top1_agreement=0.5),
                "law": {"E": 1.0, "A": 10.0, "alpha": 0.3, "rmse": 0.01},
                "ladder": [{"params": 1e3, "tokens": 2e3, "loss": 2.6}, {"params": 1e4, "tokens": 2e4, "loss": 2.0}],
                "target": {"non_embedding": 3e4, "predicted_loss": 1.9, "reached_loss": 2.0},
            },
            "alignment": {"steps": {"sft": {**job(falling), "before_after": {"eval_loss": [3.0, 2.0]}}}},
            "serving": {"front_door": front_door, "decoding": {"int8": decoding, "served": decoding}, "speedup": 1.3,
                        "model": "chat:1", "drafting": {
                            "aligned": {"target": "chat:1", "acceptance": 0.2, "speedup": 0.8, "greedy_equal": True},
                            "pretrained": {"target": "lm:1", "acceptance": 0.6, "speedup": 1.4, "greedy_equal": True}},
                        "memory_bytes_per_parameter": {"fp32": 4.0, "int8": 1.2},
                        "perplexity": {"fp32": 10.0, "int8": 10.1}, "perplexity_change": 0.01, "greedy_equal": True,
                        "chats": [{"question": "Loops?", "stream": True, "answer": "They <repeat>."}]},
            "retrieval": {"k": 5, "recall": 0.7, "chance": 0.05, "questions": 20,
                          "answers": [{"question": "Why <RAG>?", "answer": "Because [1].", "cites_retrieved": True,
                                       "citations": [{"source": "seed.md", "text": "retrieval <augments>"}]}]},
        },
    }  # fmt: skip


def test_every_figure_is_drawn_kept_as_data_and_shown(tmp_path: Path) -> None:
    page = report.write(tmp_path / "out", state())
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert sorted(figures) == sorted(report.TITLES)
    html = page.read_text()
    for name, entry in figures.items():
        png = tmp_path / "out" / entry["png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"src='{entry['png']}'" in html
    assert figures["loss_curves"]["data"]["curves"]["sft"] == [[1, 3.0], [2, 2.5], [3, 2.0]]
    assert "Why &lt;RAG&gt;?" in html and "retrieval &lt;augments&gt;" in html, "text is escaped"
    assert "chat through the gateway (http://127.0.0.1:8000)" in html
    assert figures["speculative"]["data"]["targets"]["pretrained"]["acceptance"] == 0.6
    assert "They &lt;repeat&gt;." in html and "<td>eval_loss</td><td>3</td><td>2</td>" in html, "tables under pictures"
    assert json.loads((tmp_path / "out" / "results.json").read_text())["run_id"] == "r1"


def test_the_summary_has_the_figures() -> None:
    lines = report.summary(state())
    assert any("INT8 perplexity +1.00% vs fp32, 70% less memory" in line for line in lines)
    assert any("recall@5 0.70 (chance 0.05); 1/1 answers cite" in line for line in lines)
    assert any("aligned target acceptance 20%, 0.80x plain; pretrained target acceptance 60%, 1.40x" in line
               for line in lines)  # fmt: skip


def test_a_partial_run_draws_what_it_has(tmp_path: Path) -> None:
    partial = state()
    partial["stages"] = {"data": partial["stages"]["data"]}
    report.write(tmp_path, partial)
    assert sorted(json.loads((tmp_path / "figures.json").read_text())) == ["funnel"]
