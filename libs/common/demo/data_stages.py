"""Stages 1 and 2: the real corpora, cleaned by a `prepare` job, and the tokenisers (the seed's section 2).

1. Upload the standard library's source and Python's reference text, train the model's tokeniser
   (byte-level BPE with a chat template; packing needs its ids), and run a `prepare` job through
   every cleaning stage: normalise, exact de-duplication, MinHash near-duplicates, quality rules,
   PII redaction, tokenise and pack. Each stage's documents in and out make the funnel.
2. The four tokeniser algorithms on the seed's example sentence, and the vocabulary-size trade-off
   (tokens per character against the embedding table's size).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc

from libs.common import corpora
from libs.common.clients.tokenizer import TokenizerClient
from libs.common.demo.jobs import run_job
from libs.common.demo.runner import StageContext, StageError

EXAMPLE = "The transformer architecture revolutionised natural language processing."
ALGORITHMS = ("bpe", "byte_level_bpe", "wordpiece", "unigram")
PREP_STAGES: list[dict[str, Any]] = [
    {"type": "normalize"},
    {"type": "exact_dedup"},
    {"type": "near_dedup", "threshold": 0.8},
    {"type": "quality", "min_chars": 200, "max_symbol_word_ratio": 0.3},
    {"type": "pii"},
]


def corpus_names(ctx: StageContext) -> dict[str, str]:
    """kind ("code", "prose") -> corpus name in the store (the size is part of the name)."""
    p = ctx.profile
    return {"code": f"stdlib-{p.stdlib_files or 'all'}", "prose": f"pydoc-{p.pydoc_topics or 'all'}"}


def code_documents(ctx: StageContext) -> Iterator[str]:
    return (text for _, text in corpora.stdlib_source(ctx.profile.stdlib_files or None))


def prose_topics(ctx: StageContext) -> list[tuple[str, str]]:
    """(topic, text) of the reference text, a deterministic spread of topics where the profile takes some."""
    topics = list(corpora.pydoc_topics())
    n = ctx.profile.pydoc_topics
    return topics if not n else topics[:: max(1, len(topics) // n)][:n]


def _upload(client: TokenizerClient, name: str, documents: list[str]) -> dict[str, Any]:
    try:
        reply = client.upload(name, documents)
        return {"documents": reply.documents, "bytes": reply.bytes}
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        return {"documents": len(documents), "bytes": sum(len(d.encode()) for d in documents)}


def _train(client: TokenizerClient, name: str, algorithm: str, vocab: int, corpus: list[str], **options: Any) -> str:
    final = client.train(name, algorithm, vocab, corpus=corpus, **options)
    if final.error or not final.tokenizer:
        raise StageError(f"training tokeniser {name} ({algorithm}) failed: {final.error or 'no tokeniser'}")
    return str(final.tokenizer)


def data_preparation(ctx: StageContext) -> dict[str, Any]:
    ctx.total(4 + 1)
    names = corpus_names(ctx)
    client = TokenizerClient()
    uploaded = {}
    for kind, documents in (("code", list(code_documents(ctx))), ("prose", [t for _, t in prose_topics(ctx)])):
        ctx.status(f"uploading {names[kind]}")
        uploaded[kind] = {"name": names[kind], **_upload(client, names[kind], documents)}
        ctx.say(
            f"corpus {names[kind]}: {uploaded[kind]['documents']} documents, {uploaded[kind]['bytes'] / 1e6:.2f} MB"
        )
        ctx.advance()
    ctx.status("training the model's tokeniser")
    tokenizer = _train(
        client, ctx.name("bpe"), "byte_level_bpe", ctx.profile.vocab_size, list(names.values()), chat_template="default"
    )
    ctx.say(f"model tokeniser {tokenizer} (byte-level BPE, {ctx.profile.vocab_size} tokens, ChatML template)")
    ctx.advance()
    config = {
        "tokenizer": tokenizer,
        "corpus": list(names.values()),
        "seq_len": ctx.profile.seq_len,
        "stages": PREP_STAGES,
    }
    ctx.status("prepare job")
    job = run_job(ctx, "prepare", config, "prepare", offset=3)
    funnel = _funnel(ctx, job.dataset, job.metrics, sum(u["documents"] for u in uploaded.values()))
    for row in funnel:
        ctx.say(f"  {row['stage']:<12} {row['docs_in']:>6} in -> {row['docs_out']:>6} out  {row['detail']}")
    return {
        "corpora": uploaded,
        "tokenizer": tokenizer,
        "prepare": job.to_dict(),
        "funnel": funnel,
        "dataset_job": job.job_id,
    }


def _funnel(ctx: StageContext, dataset: str, metrics: dict[str, float], uploaded: int) -> list[dict[str, Any]]:
    """Each stage's documents in and out (and what it dropped or redacted), from the data set's manifest."""
    manifest_path = ctx.store.path(dataset) / "manifest.json" if dataset else None
    if manifest_path is not None and manifest_path.is_file():
        report = json.loads(manifest_path.read_text())["report"]
        rows = []
        for s in report["stages"]:
            detail = {**s.get("dropped", {}), **s.get("counts", {})}
            shown = ", ".join(f"{k} {v}" for k, v in sorted(detail.items()))
            rows.append(
                {
                    "stage": s["name"],
                    "docs_in": s["docs_in"],
                    "docs_out": s["docs_out"],
                    "changed": s.get("docs_changed", 0),
                    "detail": shown,
                }
            )
        return rows
    rows, docs_in = [], uploaded  # the store is not local: the job's metrics carry the counts out
    for s in PREP_STAGES:
        out = int(metrics.get(f"{s['type']}_docs_out", docs_in))
        rows.append({"stage": s["type"], "docs_in": docs_in, "docs_out": out, "changed": 0, "detail": ""})
        docs_in = out
    return rows


def tokenisers(ctx: StageContext) -> dict[str, Any]:
    p = ctx.profile
    prose = corpus_names(ctx)["prose"]
    ctx.total(len(ALGORITHMS) + len(p.report_sizes))
    client = TokenizerClient()
    compared = []
    for algorithm in ALGORITHMS:
        ctx.status(f"training {algorithm}")
        ref = _train(client, ctx.name(f"cmp-{algorithm.replace('_', '-')}"), algorithm, p.compare_vocab, [prose])
        enc = client.encode(ref, EXAMPLE, return_tokens=True, add_special_tokens=False)
        compared.append({"algorithm": algorithm, "tokenizer": ref, "tokens": list(enc.tokens), "count": len(enc.ids)})
        ctx.say(f"{algorithm:<15} {len(enc.ids):>3} tokens: {' '.join(enc.tokens)}")
        ctx.advance()
    rows = []
    ctx.status("vocabulary report")
    for row in client.vocab_report(
        "byte_level_bpe", list(p.report_sizes), corpus=list(corpus_names(ctx).values()), embedding_dim=4096
    ):
        rows.append(
            {
                "vocab_size": row.vocab_size,
                "learned": row.actual_vocab_size,
                "tokens_per_char": row.tokens_per_char,
                "chars_per_token": row.chars_per_token,
                "embedding_params": row.embedding_params,
                "embedding_mb": row.embedding_bytes / 1e6,
            }
        )
        ctx.say(
            f"vocab {row.vocab_size:>6}: {row.chars_per_token:.2f} chars/token, "
            f"embedding table {row.embedding_params / 1e6:.1f}M params at d_model 4096"
        )
        ctx.advance()
    return {"example": EXAMPLE, "compared": compared, "vocab_report": rows}
