"""The built-in alignment data sets, made from text every machine has (no download), with a fixed held-out split.

    "pydoc:instructions"  prompt -> completion: a reference-text paragraph's first sentence -> the rest
    "pydoc:preferences"   prompt, chosen, rejected: the paragraph's real continuation over a continuation
                          of about the same length from a *different* topic (fluent, on-register, wrong)
    "code:preferences"    from the standard library's functions, two kinds of pairs:
                          - the function's header and docstring -> its real body over the same body with
                            one plausible corruption (a comparison flipped, an operator swapped, a boolean
                            negated, an off-by-one constant): same shape and words, wrong behaviour;
                          - the function without its docstring -> its docstring over the docstring of
                            another function of the same module.

A rejected answer is plausible text of the same kind, so a model must read the prompt to tell the
pairs apart (shuffled words, by contrast, are told apart by fluency alone).

Every record carries `split`: "heldout" for whole topics (or modules), taken in the order of a
hash of their names until they hold about an eighth of the records, "train" for the rest. The split
is by group, so a held-out prompt's topic was never trained on, and it is the same in every set
and every job: the reward model, DPO and the RL jobs are judged on prompts none of them learnt from.
"""

from __future__ import annotations

import ast
import functools
import random
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from libs.common import corpora

TRAIN, HELDOUT = "train", "heldout"
HELDOUT_SHARE = 0.125
"""Whole groups (topics or modules) are held out until they hold about this share of a set's records."""
MAX_FUNCTION_CHARS = 360
"""Functions longer than this (unparsed) are left out: the sets are for small models and short contexts."""
CODE_MODULES = 400
"""Standard-library files read for code:preferences (in their stable order)."""

Record = dict[str, str]


def held_out_groups(groups: list[str]) -> set[str]:
    """The groups held out, given each record's group: whole groups in the order of a stable hash of their
    names (so every set and every run agrees) until they hold HELDOUT_SHARE of the records."""
    sizes: dict[str, int] = {}
    for group in groups:
        sizes[group] = sizes.get(group, 0) + 1
    held: set[str] = set()
    count = 0
    for group in sorted(sizes, key=lambda g: (zlib.crc32(g.encode()), g)):
        if count + sizes[group] > HELDOUT_SHARE * len(groups) * 1.25:
            continue  # too big a topic would hold out too much on its own
        held.add(group)
        count += sizes[group]
        if count >= HELDOUT_SHARE * len(groups):
            break
    return held


def tag_splits(records: list[Record], groups: list[str]) -> list[Record]:
    held = held_out_groups(groups)
    return [{**r, "split": HELDOUT if g in held else TRAIN} for r, g in zip(records, groups, strict=True)]


def instruction_pairs() -> list[Record]:
    """pydoc:instructions, each record tagged with its topic's split."""
    pairs = corpora.instruction_pairs()
    return tag_splits(pairs, [topic_of(r["prompt"]) for r in pairs])


def topic_of(prompt: str) -> str:
    """The topic an instruction prompt names ("Topic: <name>\\n...")."""
    return prompt.split("\n", 1)[0].removeprefix("Topic: ")


def pydoc_preferences(seed: int = 0) -> list[Record]:
    """pydoc:preferences: the real continuation over one of about the same length from another topic."""
    rng = random.Random(seed)
    pairs = instruction_pairs()
    by_length = sorted(range(len(pairs)), key=lambda i: len(pairs[i]["completion"]))
    rank = {index: position for position, index in enumerate(by_length)}
    in_topic: dict[str, set[str]] = {}  # a paragraph may appear under several topics
    for pair in pairs:
        in_topic.setdefault(topic_of(pair["prompt"]), set()).add(pair["completion"])
    records = []
    for i, pair in enumerate(pairs):
        topic = topic_of(pair["prompt"])
        near = by_length[max(0, rank[i] - 6) : rank[i] + 7]  # the 12 completions nearest in length
        others = [j for j in near if pairs[j]["completion"] not in in_topic[topic]]
        rejected = pairs[rng.choice(others)]["completion"]
        records.append({**_pair(pair["prompt"], pair["completion"], rejected), "split": pair["split"]})
    return records


# -- code --------------------------------------------------------------------------------------------------


def _functions() -> Iterator[tuple[str, ast.FunctionDef]]:
    """(module, function) for each short top-level or method function with a docstring, in a stable order."""
    for module, source in corpora.stdlib_source(limit=CODE_MODULES):
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            documented = isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and len(node.body) >= 2
            if documented and len(ast.unparse(node)) <= MAX_FUNCTION_CHARS:
                yield module, node  # type: ignore[misc]


FLIPS: dict[type, type] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.And: ast.Or,
    ast.Or: ast.And,
}


Mutation = tuple[ast.AST, int]
"""A corruption: the node to change and, for a comparison, which of its operators."""


def _mutations(body: list[ast.stmt]) -> list[Mutation]:
    """Every single corruption the body allows."""
    found: list[Mutation] = []
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Compare):
                found += [(node, k) for k, op in enumerate(node.ops) if type(op) in FLIPS]
            else:
                operator = isinstance(node, ast.BinOp | ast.BoolOp) and type(node.op) in FLIPS
                number = isinstance(node, ast.Constant) and type(node.value) in (bool, int)
                found += [(node, 0)] if operator or number else []
    return found


def _apply(node: ast.AST, k: int) -> None:
    """Flip the operator, negate the boolean or add one to the integer (in place)."""
    if isinstance(node, ast.Compare):
        node.ops[k] = FLIPS[type(node.ops[k])]()
    elif isinstance(node, ast.BinOp | ast.BoolOp):
        node.op = FLIPS[type(node.op)]()
    elif isinstance(node, ast.Constant) and isinstance(node.value, int):
        node.value = not node.value if isinstance(node.value, bool) else node.value + 1


def _copy(function: ast.FunctionDef) -> ast.FunctionDef:
    copy = ast.parse(ast.unparse(function)).body[0]
    assert isinstance(copy, ast.FunctionDef)
    return copy


def _corrupted(function: ast.FunctionDef, rng: random.Random) -> str | None:
    """The function's source with one corruption in its body (None if it allows none)."""
    copy = _copy(function)
    mutations = _mutations(copy.body[1:])  # body[0] is the docstring
    if not mutations:
        return None
    _apply(*rng.choice(mutations))
    return ast.unparse(copy)


def _header(function: ast.FunctionDef) -> str:
    """The function's def line and docstring, as ast.unparse writes them (a prefix of the whole)."""
    head = _copy(function)
    head.body = head.body[:1]
    return ast.unparse(head)


def _without_docstring(function: ast.FunctionDef) -> str:
    head = _copy(function)
    head.body = head.body[1:]
    return ast.unparse(head)


@functools.cache
def code_preferences(seed: int = 0) -> list[Record]:
    """code:preferences: corrupted bodies and other functions' docstrings (see the module docstring)."""
    rng = random.Random(seed)
    records: list[Record] = []
    modules: list[str] = []
    by_module: dict[str, list[ast.FunctionDef]] = {}
    for module, function in _functions():
        by_module.setdefault(module, []).append(function)
    for module, functions in by_module.items():
        for function in functions:
            source, header = ast.unparse(function), _header(function)
            corrupted = _corrupted(function, rng)
            if corrupted is not None and source.startswith(header) and corrupted.startswith(header):
                prompt = f"# {module}\n{header}\n"
                records.append(_pair(prompt, source[len(header) + 1 :], corrupted[len(header) + 1 :]))
                modules.append(module)
            docstring = ast.get_docstring(function) or ""
            others = [ast.get_docstring(f) or "" for f in functions if f is not function]
            others = [d for d in others if d.strip() and d.strip() != docstring.strip()]
            if others:
                prompt = f"# {module}\n{_without_docstring(function)}\n# The docstring of {function.name}:\n"
                records.append(_pair(prompt, f'"""{docstring}"""', f'"""{rng.choice(others)}"""'))
                modules.append(module)
    kept = [i for i, r in enumerate(records) if r["chosen"] != r["rejected"]]
    return tag_splits([records[i] for i in kept], [modules[i] for i in kept])


def _pair(prompt: str, chosen: str, rejected: str) -> Record:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


BUILTIN: dict[str, Callable[[], list[Record]]] = {
    "pydoc:instructions": instruction_pairs,
    "pydoc:preferences": pydoc_preferences,
    "code:preferences": code_preferences,
}
"""Name -> the function that builds the set (each is stable: the same records on every call)."""


def builtin(name: str) -> list[dict[str, Any]]:
    """A fresh copy of the built-in set `name` (the code set is built once per process: it parses ~400 files)."""
    return [dict(r) for r in BUILTIN[name]()]
