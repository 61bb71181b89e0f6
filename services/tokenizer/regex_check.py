"""Refuse the regular expressions of an imported tokeniser that could hang the worker that runs them.

`tokenizers` runs Split and Replace patterns with Oniguruma, a backtracking engine: a pattern
such as `(a+)+$` or `(a|aa)*b` takes time exponential in the input, in Rust, where nothing can
stop it. This check reads a pattern once and refuses what makes backtracking explode:

- a group repeated by `*`, `+` or `{n,}` / `{n,m}` (m > 1) that itself holds a repetition or an
  alternation (nested quantifiers, ambiguous repeated alternatives);
- back-references (`\\1`, `\\k<name>`, `\\g<name>`), which no linear-time engine can run;
- patterns longer than MAX_PATTERN_CHARS.

The patterns of the tokenisers in use (GPT-2, GPT-4, Llama 3, SentencePiece's whitespace folding)
repeat only character classes and single escapes, and pass. Polynomial blow-ups such as
`\\s*\\s*$` are not caught here; the size caps on texts bound what they can cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from libs.common.errors import InvalidArgument

MAX_PATTERN_CHARS = 4096


@dataclass
class _Group:
    repeats: bool = False  # holds a repetition (at any depth)
    alternates: bool = False  # holds a '|' (at any depth)


def patterns(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(where, pattern) of every {"Regex": pattern} in a tokenizer.json tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Regex" and isinstance(value, str):
                yield where or "pattern", value
            else:
                yield from patterns(value, f"{where}.{key}" if where else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from patterns(value, f"{where}[{i}]")


def _quantifier(pattern: str, i: int) -> tuple[int, bool]:
    """At pattern[i]: (length of the quantifier there, whether it repeats more than once)."""
    if i >= len(pattern):
        return 0, False
    c = pattern[i]
    if c in "*+":
        return 1 + (i + 1 < len(pattern) and pattern[i + 1] in "?+"), True
    if c == "?":
        return 1 + (i + 1 < len(pattern) and pattern[i + 1] in "?+"), False
    if c == "{":
        end = pattern.find("}", i)
        if end < 0:
            return 0, False
        low, comma, high = (part.strip() for part in pattern[i + 1 : end].partition(","))
        if not (low.isdigit() or (comma and not low)) or (high and not high.isdigit()):
            return 0, False  # a literal '{'
        repeats = (not high or int(high) > 1) if comma else int(low) > 1
        return end - i + 1, repeats
    return 0, False


def _skip_class(pattern: str, i: int) -> int:
    """Index after the character class that starts at pattern[i] == '[' (nested classes included)."""
    depth, i = 0, i
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def check_pattern(pattern: str, field: str) -> None:
    """InvalidArgument naming `field` when `pattern` may backtrack without bound (see the module doc)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidArgument(f"a pattern of {len(pattern)} characters; at most {MAX_PATTERN_CHARS}", field=field)
    stack = [_Group()]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if (nxt.isdigit() and nxt != "0") or nxt in ("k", "g"):
                raise InvalidArgument(f"back-references cannot run in bounded time: {pattern!r}", field=field)
            i += 2
            if nxt in ("p", "P") and pattern[i : i + 1] == "{":
                i = pattern.find("}", i) + 1 or len(pattern)
            inner: _Group | None = None
        elif c == "[":
            i = _skip_class(pattern, i)
            inner = None
        elif c == "(":
            stack.append(_Group())
            i += 1
            continue
        elif c == ")" and len(stack) > 1:
            inner = stack.pop()
            i += 1
        else:
            if c == "|":
                stack[-1].alternates = True
            i += 1
            if c in "|^$":
                continue
            inner = None
        length, repeats = _quantifier(pattern, i)
        if repeats and inner is not None and (inner.repeats or inner.alternates):
            raise InvalidArgument(
                f"a repeated group holds a repetition or alternatives, which can backtrack exponentially: {pattern!r}",
                field=field,
            )
        if inner is not None:
            stack[-1].repeats |= inner.repeats or repeats
            stack[-1].alternates |= inner.alternates
        elif repeats:
            stack[-1].repeats = True
        i += length


def check_tokenizer_json(tree: Any) -> None:
    """Check every pattern of a parsed tokenizer.json; the field names where it sits."""
    for where, pattern in patterns(tree):
        check_pattern(pattern, f"data.{where}")
