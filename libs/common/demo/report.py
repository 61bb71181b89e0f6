"""The main job's report: pictures (matplotlib PNGs), the same figures as JSON, and one HTML page.

Written to demo/<profile>/runs/<run id>/ in the artifact store:

    report.html     the page (pictures, tables, sample answers with their citations)
    figures.json    {figure name: {"title", "png", "data"}}: each picture's numbers
    results.json    every stage's results and timings, as the run recorded them
    <figure>.png

Built from the run's record alone, so it can be rebuilt at any time.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

Figure = tuple[str, dict[str, Any], Callable[[Any, dict[str, Any]], None]]


def training_curves(results: dict[str, Any]) -> dict[str, list[list[float]]]:
    """Every training job's (step, loss) curve, by label."""
    curves = {}
    pre = results.get("pretraining", {})
    for key in ("sweep", "pretrain", "distill"):
        if key in pre:
            curves[key] = pre[key]["curve"]
    for key, step in results.get("alignment", {}).get("steps", {}).items():
        curves[key] = step["curve"]
    return curves


def _funnel(ax: Axes, data: dict[str, Any]) -> None:
    stages = [r["stage"] for r in data["rows"]]
    ax.barh(stages[::-1], [r["docs_out"] for r in data["rows"]][::-1], color="tab:blue")
    ax.set_xlabel("documents out")
    ax.set_title("data preparation funnel")


def _tokenisers(fig: Any, data: dict[str, Any]) -> None:
    left, right = fig.subplots(1, 2)
    left.bar([c["algorithm"] for c in data["compared"]], [c["count"] for c in data["compared"]], color="tab:green")
    left.set_ylabel("tokens for the seed's sentence")
    left.tick_params(axis="x", rotation=20)
    sizes = [r["vocab_size"] for r in data["vocab_report"]]
    right.plot(sizes, [r["chars_per_token"] for r in data["vocab_report"]], "o-", color="tab:blue")
    right.set_xscale("log")
    right.set_xlabel("vocabulary size")
    right.set_ylabel("characters per token (held out)", color="tab:blue")
    twin = right.twinx()
    twin.plot(sizes, [r["embedding_params"] / 1e6 for r in data["vocab_report"]], "s--", color="tab:red")
    twin.set_ylabel("embedding parameters (M, d=4096)", color="tab:red")


def _curves(fig: Any, data: dict[str, Any]) -> None:
    curves = data["curves"]
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (label, points) in zip(axes, curves.items(), strict=True):
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], ".-")
        ax.set_title(label)
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss")


def _planner(ax: Axes, data: dict[str, Any]) -> None:
    import numpy as np

    law = data["law"]
    points = data["ladder"]
    ns = [p["params"] for p in points] + [data["target"]["non_embedding"]]
    grid = np.geomspace(min(ns) / 1.5, max(ns) * 1.5, 50)
    ax.plot(grid, law["E"] + law["A"] / grid ** law["alpha"], "-", color="gray", label="fitted L(N)")
    ax.plot([p["params"] for p in points], [p["loss"] for p in points], "o", label="sweep models")
    target = data["target"]
    ax.plot([target["non_embedding"]], [target["predicted_loss"]], "x", ms=10, label="predicted (target)")
    ax.plot([target["non_embedding"]], [target["reached_loss"]], "*", ms=12, label="reached (target)")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend()


LABELS = {
    "fp32": "fp32",
    "int8": "INT8",
    "served": "INT8 + draft\n(served)",
    "pretrained_int8": "pretrained\nINT8",
    "pretrained_draft": "pretrained\nINT8 + draft",
}


def _throughput(fig: Any, data: dict[str, Any]) -> None:
    left, right = fig.subplots(1, 2)
    kinds = list(data["decoding"])
    labels = [LABELS.get(k, k) for k in kinds]
    left.bar(labels, [data["decoding"][k]["tokens_per_second"] for k in kinds], color="tab:purple")
    left.set_ylabel("tokens/s (greedy, batch 1)")
    right.boxplot([data["decoding"][k]["latencies"] for k in kinds], tick_labels=labels)
    right.set_ylabel("seconds per request")


def _speculative(ax: Axes, data: dict[str, Any]) -> None:
    import numpy as np

    targets = list(data["targets"])
    x = np.arange(len(targets))
    acceptance = [data["targets"][t]["acceptance"] for t in targets]
    speedup = [data["targets"][t]["speedup"] for t in targets]
    ax.bar(x - 0.2, acceptance, 0.4, color="tab:olive", label="acceptance rate")
    ax.bar(x + 0.2, speedup, 0.4, color="tab:cyan", label="speed-up vs plain INT8")
    ax.set_xticks(x, [f"{t} target\n{data['targets'][t]['target']}" for t in targets])
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend()
    ax.set_title(f"the draft with each target ({data['drafted']} drafted, {data['accepted']} accepted when served)")


def _quantisation(fig: Any, data: dict[str, Any]) -> None:
    left, right = fig.subplots(1, 2)
    left.bar(["fp32", "int8"], [data["memory"]["fp32"], data["memory"]["int8"]], color="tab:orange")
    left.set_ylabel("bytes per parameter")
    right.bar(["fp32", "int8"], [data["perplexity"]["fp32"], data["perplexity"]["int8"]], color="tab:gray")
    right.set_ylabel("held-out perplexity (seed document)")


def _recall(ax: Axes, data: dict[str, Any]) -> None:
    ax.bar([f"recall@{data['k']}", "chance"], [data["recall"], data["chance"]], color=["tab:green", "tab:gray"])
    ax.set_ylim(0, 1)
    ax.set_title(f"retrieval on {data['questions']} labelled questions")


def figures(results: dict[str, Any]) -> list[Figure]:
    """(name, data, draw) for every picture the finished stages allow."""
    out: list[Figure] = []
    if "data" in results:
        out.append(("funnel", {"rows": results["data"]["funnel"]}, _axes(_funnel)))
    if "tokenisers" in results:
        out.append(("tokenisers", results["tokenisers"], _tokenisers))
    curves = training_curves(results)
    if curves:
        out.append(("loss_curves", {"curves": curves}, _curves))
    if "pretraining" in results:
        pre = results["pretraining"]
        out.append(("planner", {"law": pre["law"], "ladder": pre["ladder"], "target": pre["target"]}, _axes(_planner)))
    if "serving" in results:
        s = results["serving"]
        spec = s["decoding"]["served"]
        out.append(("throughput", {"decoding": s["decoding"]}, _throughput))
        speculative = {
            "acceptance": spec["acceptance"],
            "speedup": s["speedup"],
            "drafted": spec["drafted"],
            "accepted": spec["accepted"],
            "targets": drafting(s),
        }
        out.append(("speculative", speculative, _axes(_speculative)))
        out.append(
            ("quantisation", {"memory": s["memory_bytes_per_parameter"], "perplexity": s["perplexity"]}, _quantisation)
        )
    if "retrieval" in results:
        r = results["retrieval"]
        out.append(("recall", {k: r[k] for k in ("k", "recall", "chance", "questions")}, _axes(_recall)))
    return out


def drafting(serving: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The draft's acceptance and speed-up with each target it was measured with (the served one at least)."""
    served = serving["decoding"]["served"]
    only = {"target": serving.get("model", ""), "acceptance": served["acceptance"], "speedup": serving["speedup"]}
    return dict(serving.get("drafting") or {"aligned": only})


def _axes(draw: Callable[[Axes, dict[str, Any]], None]) -> Callable[[Any, dict[str, Any]], None]:
    return lambda fig, data: draw(fig.subplots(), data)


def write(folder: Path, state: dict[str, Any]) -> Path:
    """Draw every figure, write figures.json, results.json and report.html; returns the page's path."""
    folder.mkdir(parents=True, exist_ok=True)
    results = state["stages"]
    index = {}
    for name, data, draw in figures(results):
        fig = plt.figure(figsize=(11, 3.6), layout="constrained")
        draw(fig, data)
        fig.savefig(folder / f"{name}.png", dpi=90)
        plt.close(fig)
        index[name] = {"title": TITLES[name], "png": f"{name}.png", "data": data}
    (folder / "figures.json").write_text(json.dumps(index, indent=1))
    (folder / "results.json").write_text(json.dumps(state, indent=1))
    page = folder / "report.html"
    page.write_text(_html(state, index))
    return page


TITLES = {
    "funnel": "Data preparation: documents through each stage",
    "tokenisers": "Tokenisers: the seed's sentence, and the vocabulary-size trade-off",
    "loss_curves": "Training loss of every training stage",
    "planner": "Scaling-law planner: predicted against reached held-out loss",
    "throughput": "Serving: throughput and latency (greedy, batch 1)",
    "speculative": "Speculative decoding: the distilled draft with the target it imitates and with the served one",
    "quantisation": "INT8 quantisation: memory and held-out perplexity",
    "recall": "Retrieval recall against chance",
}


def _table(head: list[str], rows: list[list[Any]]) -> str:
    e = html.escape
    cells = "".join("<tr>" + "".join(f"<td>{e(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + f"</tr>{cells}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def tables(results: dict[str, Any]) -> dict[str, str]:
    """Figure name -> the table shown under its picture."""
    out = {}
    if "data" in results:
        rows = [[r["stage"], r["docs_in"], r["docs_out"], r["detail"]] for r in results["data"]["funnel"]]
        out["funnel"] = _table(["stage", "documents in", "out", "dropped / redacted / counted"], rows)
    if "tokenisers" in results:
        rows = [[c["algorithm"], c["count"], " ".join(c.get("tokens", []))] for c in results["tokenisers"]["compared"]]
        out["tokenisers"] = _table(["algorithm", "tokens", "pieces"], rows)
    if "pretraining" in results:
        rows = [
            [r["method"], r["params"], r["tokens"], r["predicted_loss"]] for r in results["pretraining"].get("plan", [])
        ]
        out["planner"] = _table(["planner (budget of the target run)", "parameters", "tokens", "predicted loss"], rows)
    steps = results.get("alignment", {}).get("steps", {})
    if steps:
        rows = [
            [key, step["model"], m, b, a] for key, step in steps.items() for m, (b, a) in step["before_after"].items()
        ]
        out["loss_curves"] = _table(["step", "model", "held-out metric", "before", "after"], rows)
    if "serving" in results:
        rows = [
            [c["question"], "streamed" if c["stream"] else "whole", c["answer"]] for c in results["serving"]["chats"]
        ]
        door = results["serving"]["front_door"]
        out["throughput"] = _table([f"chat through the gateway ({door})", "reply", "answer"], rows)
        d = drafting(results["serving"])
        rows = [[t, v["target"], v["acceptance"], v["speedup"], v.get("greedy_equal", "-")] for t, v in d.items()]
        out["speculative"] = _table(
            ["target", "model", "acceptance", "speed-up vs plain INT8", "greedy outputs equal"], rows
        )
    return out


def _html(state: dict[str, Any], index: dict[str, Any]) -> str:
    e = html.escape
    results = state["stages"]
    parts = [f"<h1>llmp demo: profile {e(state['profile'])}, run {e(state['run_id'])}</h1>"]
    parts.append("<h2>Summary</h2><ul>" + "".join(f"<li>{e(line)}</li>" for line in summary(state)) + "</ul>")
    below = tables(results)
    for name, entry in index.items():
        parts.append(f"<h2>{e(entry['title'])}</h2><img src='{e(entry['png'])}' style='max-width:100%'>")
        parts.append(below.get(name, ""))
    if results.get("retrieval", {}).get("answers"):
        parts.append("<h2>RAG answers with their citations</h2>")
    for answer in results.get("retrieval", {}).get("answers", []):
        cites = "".join(
            f"<li>{e(str(c.get('source')))} ({e(str(c.get('chunk_id', '')))}): {e(str(c.get('text', ''))[:300])}</li>"
            for c in answer["citations"]
        )
        parts.append(f"<h3>Q: {e(answer['question'])}</h3><p>A: {e(answer['answer'])}</p><ol>{cites}</ol>")
    timings = "".join(f"<tr><td>{e(k)}</td><td>{v:.0f} s</td></tr>" for k, v in state["timings"].items())
    parts.append(f"<h2>Time per stage</h2><table>{timings}</table>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 12px;text-align:left}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>llmp demo</title><style>{style}</style></head>"
        f"<body>{''.join(parts)}</body></html>"
    )


def summary(state: dict[str, Any]) -> list[str]:
    """The run in a few lines (printed at the end and at the top of the page)."""
    r = state["stages"]
    lines = []
    if "data" in r:
        f = r["data"]["funnel"]
        lines.append(f"data: {f[0]['docs_in']} documents in, {f[-1]['docs_out']} out, through {len(f)} stages")
    if "pretraining" in r:
        t = r["pretraining"]["target"]
        agreement = r["pretraining"]["distill"]["metrics"]["top1_agreement"]
        lines.append(
            f"pretraining: held-out loss {t['reached_loss']:.3f} (the sweep's law predicted "
            f"{t['predicted_loss']:.3f}); draft agreement {agreement:.2f}"
        )
    for key, step in r.get("alignment", {}).get("steps", {}).items():
        shown = ", ".join(f"{m} {_n(b)} -> {_n(a)}" for m, (b, a) in list(step["before_after"].items())[:2])
        lines.append(f"{key}: {step['model']} ({shown})")
    if "serving" in r:
        s = r["serving"]
        lines.append(
            f"serving: INT8 perplexity {s['perplexity_change']:+.2%} vs fp32, "
            f"{1 - s['memory_bytes_per_parameter']['int8'] / max(s['memory_bytes_per_parameter']['fp32'], 1e-9):.0%} "
            f"less memory; greedy outputs with the draft {'equal' if s['greedy_equal'] else 'DIFFER'}"
        )
        lines.append(
            "speculative decoding: "
            + "; ".join(
                f"{t} target acceptance {d['acceptance']:.0%}, {d['speedup']:.2f}x plain"
                for t, d in drafting(s).items()
            )
        )
    if "retrieval" in r:
        q = r["retrieval"]
        cited = sum(a["cites_retrieved"] for a in q["answers"])
        lines.append(
            f"retrieval: recall@{q['k']} {q['recall']:.2f} (chance {q['chance']:.2f}); "
            f"{cited}/{len(q['answers'])} answers cite retrieved chunks"
        )
    lines.append(f"wall time: {sum(state['timings'].values()):.0f} s over {len(state['timings'])} stages")
    return lines


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
