"""Chunkers as plugins (group `llmp.chunkers`): split a document into spans with character offsets.

Every chunk keeps its position in the document and the [start, end) character offsets of its
text in the source, so a citation points back to the exact passage. Sizes are in tokens of a
`TokenCounter` (the embedder's tokeniser, or a tokenizer service one). Built-ins:

- `fixed`: windows of `size` tokens, each sharing `overlap` tokens with the one before.
- `sentences`: whole sentences packed up to `size` tokens, repeating `overlap` sentences.
- `recursive`: by structure (Markdown headings, fenced code, paragraphs; top-level `def`/`class`
  in code), packed up to `size` tokens within one section; an oversized block falls back to
  sentences (lines for code), then to token windows.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from libs.common.plugins import Registry
from services.retrieval.tokens import TokenCounter

KINDS = ("text", "markdown", "code")
Span = tuple[int, int]

SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n[ \t]*\n")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
TOP_LEVEL_RE = re.compile(r"^(?:async\s+def|def|class)\s+(\w+)|^@")


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int
    end: int
    text: str
    #: Heading path above the chunk ("A > B"), or the enclosing top-level definition in code.
    section: str = ""


def trim(text: str, start: int, end: int) -> Span:
    """Shrink [start, end) to exclude surrounding whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def windows(text: str, span: Span, size: int, overlap: int, tokens: TokenCounter) -> list[Span]:
    """Token windows over text[span]: `size` tokens each, consecutive ones sharing `overlap`."""
    start, end = span
    offsets = [(s + start, e + start) for s, e in tokens.offsets(text[start:end]) if e > s]
    out: list[Span] = []
    step = size - overlap
    for i in range(0, len(offsets), step):
        last = min(i + size, len(offsets)) - 1
        out.append((offsets[i][0], offsets[last][1]))
        if last == len(offsets) - 1:
            break
    return out


def sentences(text: str, span: Span) -> list[Span]:
    start, end = span
    cuts = [start, *(m.end() for m in SENTENCE_END_RE.finditer(text, start, end)), end]
    spans = [trim(text, a, b) for a, b in itertools.pairwise(cuts)]
    return [s for s in spans if s[1] > s[0]]


def lines(text: str, span: Span) -> list[Span]:
    start, end = span
    out, pos = [], start
    for line in text[start:end].splitlines(keepends=True):
        s = trim(text, pos, pos + len(line))
        if s[1] > s[0]:
            out.append(s)
        pos += len(line)
    return out


def pack(spans: Sequence[Span], counts: Sequence[int], size: int, overlap: int = 0) -> list[list[int]]:
    """Group consecutive span indices so each group's token total stays within `size`.

    A span larger than `size` is a group of its own (the caller splits it further). Each new group
    starts with up to `overlap` spans of the previous one, when they fit.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for i, count in enumerate(counts):
        if current and sum(counts[j] for j in current) + count > size:
            groups.append(current)
            carried = current[-overlap:] if overlap and counts[i] <= size else []
            while carried and sum(counts[j] for j in carried) + count > size:
                carried = carried[1:]
            current = list(carried)
        current.append(i)
    if current:
        groups.append(current)
    return groups


class Chunker:
    def spans(self, text: str, kind: str, tokens: TokenCounter) -> list[tuple[int, int, str]]:
        """(start, end, section) of each chunk, in document order."""
        raise NotImplementedError

    def split(self, text: str, kind: str, tokens: TokenCounter) -> list[Chunk]:
        out: list[Chunk] = []
        for start, end, section in self.spans(text, kind, tokens):
            start, end = trim(text, start, end)
            if end > start:
                out.append(Chunk(len(out), start, end, text[start:end], section))
        return out


def _check_size(size: int, overlap: int) -> None:
    if size <= 0:
        raise ValueError("size must be > 0")
    if not 0 <= overlap < size:
        raise ValueError("overlap must be >= 0 and < size")


class FixedChunker(Chunker):
    def __init__(self, size: int = 256, overlap: int = 32) -> None:
        _check_size(size, overlap)
        self.size, self.overlap = size, overlap

    def spans(self, text: str, kind: str, tokens: TokenCounter) -> list[tuple[int, int, str]]:
        return [(s, e, "") for s, e in windows(text, (0, len(text)), self.size, self.overlap, tokens)]


class SentenceChunker(Chunker):
    def __init__(self, size: int = 256, overlap: int = 0) -> None:
        _check_size(size, overlap)
        self.size, self.overlap = size, overlap

    def pieces(self, text: str, parts: list[Span], tokens: TokenCounter) -> list[Span]:
        """Pack `parts` up to `size` tokens; a part still too large becomes token windows."""
        counts = tokens.count([text[s:e] for s, e in parts])
        out: list[Span] = []
        for group in pack(parts, counts, self.size, self.overlap):
            if len(group) == 1 and counts[group[0]] > self.size:
                out.extend(windows(text, parts[group[0]], self.size, 0, tokens))
            else:
                out.append((parts[group[0]][0], parts[group[-1]][1]))
        return out

    def spans(self, text: str, kind: str, tokens: TokenCounter) -> list[tuple[int, int, str]]:
        parts = lines(text, (0, len(text))) if kind == "code" else sentences(text, (0, len(text)))
        return [(s, e, "") for s, e in self.pieces(text, parts, tokens)]


def markdown_blocks(text: str) -> list[tuple[int, int, str]]:
    """Headings, fenced code blocks and paragraphs, each with its heading path."""
    blocks: list[tuple[int, int, str]] = []
    path: list[tuple[int, str]] = []
    block_start: int | None = None
    fenced = False
    pos = 0

    def close(end: int) -> None:
        nonlocal block_start
        if block_start is not None:
            blocks.append((block_start, end, " > ".join(t for _, t in path)))
            block_start = None

    for line in text.splitlines(keepends=True):
        end = pos + len(line)
        heading = None if fenced else HEADING_RE.match(line)
        if FENCE_RE.match(line):
            if fenced:
                close(end)
            else:
                close(pos)
                block_start = pos
            fenced = not fenced
        elif heading:
            close(pos)
            level = len(heading.group(1))
            path = [*(p for p in path if p[0] < level), (level, heading.group(2))]
            block_start = pos
            close(end)
        elif not fenced and not line.strip():
            close(pos)
        elif block_start is None:
            block_start = pos
        pos = end
    close(pos)
    return blocks


def code_blocks(text: str) -> list[tuple[int, int, str]]:
    """Top-level definitions (with their decorators) and the statements between them."""
    blocks: list[tuple[int, int, str]] = []
    start, section, pos, in_decorators = 0, "", 0, False
    for line in text.splitlines(keepends=True):
        top = TOP_LEVEL_RE.match(line)
        if top and not in_decorators:
            if pos > start:
                blocks.append((start, pos, section))
            start = pos
        if top:
            in_decorators = line.startswith("@")
            section = top.group(1) or section
        pos += len(line)
    blocks.append((start, pos, section))
    return blocks


def paragraph_blocks(text: str) -> list[tuple[int, int, str]]:
    cuts = [0, *(m.end() for m in re.finditer(r"\n[ \t]*\n", text)), len(text)]
    return [(a, b, "") for a, b in itertools.pairwise(cuts)]


BLOCKS = {"markdown": markdown_blocks, "code": code_blocks, "text": paragraph_blocks}


class RecursiveChunker(Chunker):
    def __init__(self, size: int = 256) -> None:
        _check_size(size, 0)
        self.size = size
        self.fallback = SentenceChunker(size)

    def spans(self, text: str, kind: str, tokens: TokenCounter) -> list[tuple[int, int, str]]:
        blocks = [(*trim(text, s, e), section) for s, e, section in BLOCKS[kind](text)]
        blocks = [b for b in blocks if b[1] > b[0]]
        counts = tokens.count([text[s:e] for s, e, _ in blocks])
        out: list[tuple[int, int, str]] = []
        group: list[int] = []

        def flush() -> None:
            if group:
                out.append((blocks[group[0]][0], blocks[group[-1]][1], blocks[group[0]][2]))
                group.clear()

        for i, (start, end, section) in enumerate(blocks):
            if counts[i] > self.size:
                flush()
                code = kind == "code" or FENCE_RE.match(text[start:end]) is not None
                parts = lines(text, (start, end)) if code else sentences(text, (start, end))
                out.extend((s, e, section) for s, e in self.fallback.pieces(text, parts, tokens))
                continue
            if group and (blocks[group[0]][2] != section or sum(counts[j] for j in group) + counts[i] > self.size):
                flush()
            group.append(i)
        flush()
        return out


CHUNKERS: Registry[Chunker] = Registry(
    "chunkers",
    {
        "fixed": "services.retrieval.chunkers:FixedChunker",
        "sentences": "services.retrieval.chunkers:SentenceChunker",
        "recursive": "services.retrieval.chunkers:RecursiveChunker",
    },
    base=Chunker,
)
