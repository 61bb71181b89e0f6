"""Stages 5 and 6: serve the aligned model (the seed's section 7) and answer with retrieval (section 6).

5. Three replicas of the aligned model: fp32, INT8, and INT8 with speculative decoding drafted by
   the distilled model (the one that stays served), then, in place of the first two, two of the
   pretrained target the draft was distilled from (INT8, and INT8 with the same draft). Measured on
   them: held-out perplexity (fp32 vs INT8, on the seed document, which no model trained on),
   memory per parameter, greedy decoding speed at batch 1 with and without the draft (same INT8
   target, so the outputs must be equal), and the draft's acceptance rate and speed-up with each
   target: the one it imitates, and the aligned one it is served with. Then chat, whole and
   streamed, through the gateway.
6. The seed document and the reference text in a hybrid collection; recall@k on the labelled
   questions (services/retrieval/eval: each has one answer span) against chance; RAG answers with
   citations through the gateway.
"""

from __future__ import annotations

import contextlib
import json
import random
from importlib import resources
from typing import Any

from libs.common.clients.retrieval import RetrievalClient
from libs.common.clients.tokenizer import TokenizerClient
from libs.common.clients.training import TrainingClient
from libs.common.corpora import instruction_pairs
from libs.common.demo.data_stages import prose_topics
from libs.common.demo.front_door import Gateway
from libs.common.demo.runner import StageContext, StageError
from libs.common.demo.serving import Decoding, Inference, decode

RECALL_K = 5
DRAFT_TOKENS = 4
EVAL = "services.retrieval.eval"  # the labelled questions and the seed document, as package data


def seed_text() -> str:
    return (resources.files(EVAL) / "seed.md").read_text(encoding="utf-8")


def heldout_sequences(ctx: StageContext, tokenizer: str) -> list[list[int]]:
    """Windows of the seed document (which no model trained on), spread over it, as the model's token ids."""
    p = ctx.profile
    (ids,) = TokenizerClient().encode_batch(tokenizer, [seed_text()], add_special_tokens=False)
    n = p.heldout_tokens
    starts = range(0, len(ids) - n, max(n, (len(ids) - n) // p.heldout_texts))
    windows = [ids[s : s + n] for s in starts][: p.heldout_texts]
    if not windows:
        raise StageError(f"the seed document gives no held-out window of {n} tokens")
    return windows


def serving(ctx: StageContext) -> dict[str, Any]:
    p = ctx.profile
    ctx.total(7)
    training = TrainingClient()
    model = training.model(ctx.results["alignment"]["served_model"])
    draft = training.model(ctx.results["pretraining"]["distill"]["model"])
    pretrained = training.model(ctx.results["pretraining"]["pretrain"]["model"])
    tokenizer = model.lineage.tokenizer
    names = {
        "fp32": ctx.name("chat-fp32"),
        "int8": ctx.name("chat-int8"),
        "served": ctx.name("chat"),
        "pretrained_int8": ctx.name("lm-int8"),
        "pretrained_draft": ctx.name("lm-int8-draft"),
    }
    speculative = json.dumps({"type": "draft_model", "model": draft.path, "num_tokens": DRAFT_TOKENS})
    served_engine = {"quantization": "int8", "speculative": speculative}
    inference = Inference()
    ctx.status("loading three replicas")
    inference.ensure_loaded(names["fp32"], model.path)
    inference.ensure_loaded(names["int8"], model.path, quantization="int8")
    inference.ensure_loaded(names["served"], model.path, **served_engine)
    ctx.say(f"serving {model.ref} as {names['served']}: INT8 weights, speculative decoding drafted by {draft.ref}")
    ctx.advance()

    sequences = heldout_sequences(ctx, tokenizer)
    ppl = {}
    for kind in ("fp32", "int8"):
        ctx.status(f"held-out perplexity, {kind}")
        ppl[kind] = inference.perplexity(names[kind], sequences)
        ctx.advance()
    change = ppl["int8"] / ppl["fp32"] - 1
    ctx.say(f"held-out perplexity: fp32 {ppl['fp32']:.2f}, INT8 {ppl['int8']:.2f} ({change:+.2%})")

    prompts = TokenizerClient().encode_batch(
        tokenizer, [r["prompt"] for r in instruction_pairs()[-p.speed_prompts :]], add_special_tokens=False
    )
    ctx.status("greedy decoding: fp32, INT8 and INT8 + draft in turn")
    runs = decode(inference, {k: names[k] for k in ("fp32", "int8", "served")}, prompts, p.new_tokens)
    memory = {kind: inference.info(names[kind]).load.bytes_per_parameter for kind in ("fp32", "int8")}
    for kind in ("fp32", "int8"):
        inference.unload(names[kind])
    ctx.status("greedy decoding: the pretrained target, INT8 alone and with the draft, in turn")
    inference.ensure_loaded(names["pretrained_int8"], pretrained.path, quantization="int8")
    inference.ensure_loaded(names["pretrained_draft"], pretrained.path, **served_engine)
    runs |= decode(inference, {k: names[k] for k in ("pretrained_int8", "pretrained_draft")}, prompts, p.new_tokens)
    for kind in ("pretrained_int8", "pretrained_draft"):
        inference.unload(names[kind])
    ctx.advance(3)
    drafting = {
        "aligned": _drafting(runs["served"], runs["int8"], model.ref),
        "pretrained": _drafting(runs["pretrained_draft"], runs["pretrained_int8"], pretrained.ref),
    }
    for target, d in drafting.items():
        ctx.say(
            f"speculative decoding of the {target} target ({d['target']}): acceptance {d['acceptance']:.0%}, "
            f"{d['speedup']:.2f}x its plain INT8 decoding ({d['tokens_per_second']:.0f} vs "
            f"{d['plain_tokens_per_second']:.0f} tokens/s); greedy outputs "
            f"{'identical' if d['greedy_equal'] else 'DIFFERENT'}"
        )
    ctx.say(
        f"weights: {memory['fp32']:.2f} bytes/parameter fp32, {memory['int8']:.2f} INT8 "
        f"({1 - memory['int8'] / max(memory['fp32'], 1e-9):.0%} saved)"
    )

    door = Gateway({names["served"]: tokenizer})
    chats = _chats(ctx, door, names["served"])
    ctx.advance()
    inference.close()
    return {
        "model": model.ref,
        "draft": draft.ref,
        "served_name": names["served"],
        "tokenizer": tokenizer,
        "served_path": model.path,
        "served_engine": served_engine,
        "parameters": model.parameters,
        "front_door": door.base,
        "perplexity": ppl,
        "perplexity_change": change,
        "heldout_tokens": sum(len(s) - 1 for s in sequences),
        "memory_bytes_per_parameter": memory,
        "decoding": {
            k: {
                "tokens_per_second": r.tokens_per_second,
                "latencies": r.latencies,
                "tokens": r.tokens,
                "drafted": r.drafted,
                "accepted": r.accepted,
                "acceptance": r.acceptance,
            }
            for k, r in runs.items()
        },
        "speedup": drafting["aligned"]["speedup"],
        "greedy_equal": drafting["aligned"]["greedy_equal"],
        "drafting": drafting,
        "chats": chats,
    }


def _drafting(drafted: Decoding, plain: Decoding, target: str) -> dict[str, Any]:
    """The draft with one target: acceptance, speed-up over the same INT8 target without it, equal outputs."""
    return {
        "target": target,
        "acceptance": drafted.acceptance,
        "speedup": drafted.tokens_per_second / max(plain.tokens_per_second, 1e-9),
        "tokens_per_second": drafted.tokens_per_second,
        "plain_tokens_per_second": plain.tokens_per_second,
        "greedy_equal": drafted.outputs == plain.outputs,
    }


def _chats(ctx: StageContext, door: Gateway, model: str) -> list[dict[str, Any]]:
    questions = ["What does the for statement do?", "How are default parameter values evaluated?"]
    chats = []
    for question, stream in zip(questions, (False, True), strict=True):
        ctx.status(f"chat through the gateway ({'streamed' if stream else 'whole'})")
        reply = door.chat(model, [{"role": "user", "content": question}], ctx.profile.new_tokens, stream)
        chats.append(
            {
                "question": question,
                "stream": stream,
                "answer": reply.text,
                "seconds": reply.seconds,
                "first_token_seconds": reply.first_token_seconds,
                "chunks": reply.chunks,
                "tokens": reply.completion_tokens,
            }
        )
        ctx.say(f"chat{' (streamed)' if stream else ''}: {question} -> {reply.text[:100]!r}")
    return chats


def labelled_questions(sources: set[str], limit: int) -> list[dict[str, Any]]:
    """The labelled retrieval questions about these sources, an even spread of at most `limit`."""
    lines = (resources.files(EVAL) / "questions.jsonl").read_text(encoding="utf-8").splitlines()[1:]
    rows = [q for q in map(json.loads, lines) if q["source"] in sources]
    chosen = sorted(random.Random(0).sample(range(len(rows)), min(limit, len(rows))))
    return [rows[i] for i in chosen]


def retrieval(ctx: StageContext) -> dict[str, Any]:
    p = ctx.profile
    from llmp.retrieval.v1 import retrieval_pb2 as rpb

    client = RetrievalClient()
    collection = ctx.name("docs")
    documents = [rpb.Document(id="seed.md", text=seed_text(), source="seed.md", kind="markdown")]
    documents += [
        rpb.Document(id=f"pydoc:{t}", text=text, source=f"pydoc:{t}", kind="text") for t, text in prose_topics(ctx)
    ]
    questions = labelled_questions({d.source for d in documents}, p.recall_questions)
    ctx.total(len(documents) + len(questions) + p.rag_questions)
    if collection in {c.name for c in client.list_collections()}:
        client.delete(collection)  # an earlier run's may have another embedder or chunk size
    chunker = {"type": "recursive", "size": p.chunk_tokens}
    client.create(collection, embedder=p.embedder, sparse=True, chunker=chunker)
    chunks = 0
    for start in range(0, len(documents), 8):
        ctx.status(f"ingesting documents {start + 1}-{min(start + 8, len(documents))} of {len(documents)}")
        chunks += client.ingest(collection, documents[start : start + 8]).chunks
        ctx.advance(len(documents[start : start + 8]))
    ctx.say(f"collection {collection}: {len(documents)} documents, {chunks} chunks (hybrid: dense + BM25)")

    hits_found = 0
    for q in questions:
        ctx.status("recall@5 on the labelled questions")
        hits = client.search(collection, q["question"], top_k=RECALL_K, mode="hybrid")
        hits_found += any(_overlaps(h.source, h.start, h.end, q) for h in hits)
        ctx.advance()
    recall = hits_found / max(len(questions), 1)
    chance = _chance(documents, questions, chunks)
    ctx.say(f"recall@{RECALL_K}: {recall:.2f} on {len(questions)} questions (chance about {chance:.2f})")

    served = ctx.results["serving"]
    with contextlib.closing(Inference()) as inference:  # the stack may have restarted since it was served
        inference.ensure_loaded(served["served_name"], served["served_path"], **served["served_engine"])
    door = Gateway({served["served_name"]: served["tokenizer"]})
    answers = []
    for q in [q for q in questions if q["kind"] == "heading"][: p.rag_questions]:
        ctx.status("RAG answers")
        answer = door.rag_answer(collection, q["question"], served["served_name"], 3, p.new_tokens)
        retrieved = [
            {"source": h.source, "start": h.start, "end": h.end, "chunk_id": f"{h.document_id}#{h.chunk_index}"}
            for h in client.search(collection, q["question"], top_k=3, mode="hybrid")
        ]
        cited = [c for c in answer.citations if _is_retrieved(c, retrieved)]
        answers.append(
            {
                "question": q["question"],
                "answer": answer.answer,
                "citations": answer.citations,
                "retrieved": retrieved,
                "cites_retrieved": bool(cited) and len(cited) == len(answer.citations),
                "seconds": answer.seconds,
            }
        )
        sources = ", ".join(f"[{i + 1}] {c.get('source')}" for i, c in enumerate(answer.citations))
        ctx.say(f"Q: {q['question']}\n    A: {answer.answer[:120]!r}\n    cites {sources or 'nothing'}")
        ctx.advance()
    return {
        "collection": collection,
        "documents": len(documents),
        "chunks": chunks,
        "k": RECALL_K,
        "questions": len(questions),
        "recall": recall,
        "chance": chance,
        "answers": answers,
        "front_door": door.base,
    }


def _overlaps(source: str, start: int, end: int, answer: dict[str, Any]) -> bool:
    return source == answer["source"] and start < answer["end"] and answer["start"] < end


def _is_retrieved(citation: dict[str, Any], retrieved: list[dict[str, Any]]) -> bool:
    if citation.get("chunk_id") and any(citation["chunk_id"] == r["chunk_id"] for r in retrieved):
        return True
    if "start" in citation and "end" in citation:
        return any(_overlaps(r["source"], r["start"], r["end"], citation) for r in retrieved)
    return False


def _chance(documents: list[Any], questions: list[dict[str, Any]], chunks: int) -> float:
    """Recall@k of k chunks drawn at random: k x (chunks overlapping the answer) / chunks, averaged."""
    if not questions or not chunks:
        return 0.0
    chars_per_chunk = sum(len(d.text) for d in documents) / chunks
    total = 0.0
    for q in questions:
        overlapping = (q["end"] - q["start"]) / chars_per_chunk + 1
        total += min(1.0, RECALL_K * overlapping / chunks)
    return total / len(questions)
