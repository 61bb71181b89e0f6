"""Build the labelled retrieval set: `python -m services.retrieval.eval.make_questions`.

Questions are generated deterministically from section headings, so each has exactly one
answer passage: the body of that section, given as source + [start, end) character offsets.
Two questions per section: "What does <the document> say about <heading>?" and the first twelve
words of the section's first sentence (a keyword-style query that never names the heading).
Sources are the project's seed document (eval/seed.md, Markdown headings) and Python's
reference text (`pydoc_data.topics`, reStructuredText-style underlined titles). Headings and
sentence queries that occur twice are left out, so no question has two right answers. A retrieved chunk counts as a
hit when it overlaps the answer span in the same source (so any chunker can be scored).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from libs.common import corpora

HERE = Path(__file__).parent
SEED = HERE / "seed.md"
OUT = HERE / "questions.jsonl"
MD_HEADING_RE = re.compile(r"^(#{2,6})\s+(?:\d+\.\s+)?(.+?)\s*$", re.M)
FIRST_SENTENCE_RE = re.compile(r"[^.:!?]*", re.S)
RST_TITLE_RE = re.compile(r"^(\S.*)\n([*=\-^~])\2+\n", re.M)


def corpus() -> dict[str, str]:
    """source -> text of every document the questions are about."""
    return {"seed.md": SEED.read_text(), **{f"pydoc:{k}": v for k, v in corpora.pydoc_topics()}}


def sections(source: str, text: str) -> Iterator[tuple[str, int, int]]:
    """(title, body start, body end) of each titled section."""
    if source.endswith(".md"):
        marks = [(m.group(2), m.start(), m.end()) for m in MD_HEADING_RE.finditer(text)]
    else:
        marks = [
            (m.group(1).strip(), m.start(), m.end())
            for m in RST_TITLE_RE.finditer(text)
            if len(m.group(0).splitlines()[1]) >= len(m.group(1).strip())
        ]
    for i, (title, _, body) in enumerate(marks):
        end = marks[i + 1][1] if i + 1 < len(marks) else len(text)
        start = body + len(text[body:end]) - len(text[body:end].lstrip())
        if len(text[start:end].strip()) >= 80:
            yield title, start, end


def questions() -> list[dict[str, object]]:
    found = [(source, *s) for source, text in corpus().items() for s in sections(source, text)]
    titles = Counter(title.lower() for _, title, _, _ in found)
    texts = corpus()
    out = []
    for source, title, start, end in found:
        if titles[title.lower()] != 1:
            continue
        where = "the LLM guide" if source == "seed.md" else "the Python reference"
        answer = {"source": source, "start": start, "end": end}
        out.append({"question": f"What does {where} say about {title.rstrip('?')}?", "kind": "heading", **answer})
        words = FIRST_SENTENCE_RE.match(texts[source][start:end]).group(0).split()  # type: ignore[union-attr]
        if len(words) >= 6:
            out.append({"question": " ".join(words[:12]), "kind": "sentence", **answer})
    repeated = Counter(q["question"] for q in out)
    return [q for q in out if repeated[q["question"]] == 1]


def main() -> None:
    rows = questions()
    header = {"about": __doc__.split("\n\n")[1].replace("\n", " "), "questions": len(rows)}
    OUT.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [header, *rows]) + "\n")
    print(f"wrote {len(rows)} questions to {OUT}")


if __name__ == "__main__":
    main()
