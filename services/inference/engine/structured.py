"""Structured output: a sampler stage that only lets tokens through that keep the text in a grammar.

    {"type": "structured", "json_schema": {...}}   # JSON that validates against the schema
    {"type": "structured", "json_object": true}    # any JSON object
    {"type": "structured", "regex": "[0-9]{3}"}    # text matching the regular expression
    {"type": "structured", "choice": ["yes", "no"]}  # exactly one of the strings

JSON is compact (no whitespace between tokens). The grammar is compiled by llguidance (the Rust
engine of Microsoft's guidance) against the model's own tokenizer, so the mask is exact for
multi-byte tokens. Each sequence's stage holds its own matcher, kept in step with the tokens
generated so far (rolled back when speculative decoding offers drafts that are then rejected).
Once the grammar is complete only the end-of-sequence token is allowed, so the model must have
one.

Masks are computed for the whole batch at once: before sampling a step, the engine hands every
stage of this kind to `prepare_batch`, which fills all their masks in one parallel call and unpacks
them into one boolean tensor; a stage called outside a step (a draft's verification) computes its
own. A grammar is compiled once: requests with the same constraint start from a copy of its
matcher (the most recent MAX_CACHED_GRAMMARS are kept).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.inference.engine.sampling import LogitsProcessor, SamplingContext

MAX_GRAMMAR_CHARS = 64 << 10
"""Largest schema, regex or list of choices (as JSON text)."""
FORMS = ("json_schema", "json_object", "regex", "choice")
MAX_CACHED_GRAMMARS = 64
"""Compiled constraints kept for the next request that asks for the same one."""
PARALLEL_FROM = 16
"""Sequences from which a step's masks are computed on llguidance's threads; fewer are computed in turn,
which costs less than handing them to the threads."""


@dataclass
class _Compiled:
    """What is built once per tokenizer: llguidance's view of it, and the constraints compiled against it."""

    tokenizer: Any  # llguidance.LLTokenizer
    matchers: OrderedDict[tuple[str, str], Any] = field(default_factory=OrderedDict)
    """(form, value as JSON) -> a matcher at the start of that constraint, most recently used last."""


_tokenizers: weakref.WeakKeyDictionary[Any, _Compiled] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_executor: Any = None


def _compiled(tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> _Compiled:
    """llguidance's view of a `tokenizers.Tokenizer` (about a second to build, so one per tokenizer)."""
    import llguidance

    with _lock:
        cached = _tokenizers.get(tokenizer)
        if cached is None:
            ll = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))
            cached = _tokenizers[tokenizer] = _Compiled(ll)
        return cached


def _grammar(form: str, value: Any) -> str:
    import llguidance

    # Compact JSON: no whitespace between tokens, so a sample cannot wander off into blanks.
    compact = llguidance.JsonCompiler(separators=(",", ":"), whitespace_flexible=False)
    if form == "json_object":
        if value is not True:
            raise ValueError("json_object must be true")
        return str(compact.compile(json.dumps({"type": "object"})))
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"{form} is over {MAX_GRAMMAR_CHARS} characters")
    if form == "json_schema":
        if not isinstance(value, dict):
            raise ValueError("json_schema must be a JSON schema object")
        return str(compact.compile(text))
    if form == "regex":
        if not isinstance(value, str):
            raise ValueError("regex must be a string")
        return str(llguidance.LLMatcher.grammar_from_regex(value))
    if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
        raise ValueError("choice must be a list of non-empty strings")
    return str(llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value)))


def _matcher(compiled: _Compiled, form: str, value: Any) -> Any:
    """A matcher at the start of the constraint: a copy of the one compiled for it before, else a new one."""
    import llguidance

    key = (form, json.dumps(value, sort_keys=True))
    with _lock:
        start = compiled.matchers.get(key)
        if start is not None:
            compiled.matchers.move_to_end(key)
            return start.deep_copy()
    matcher = llguidance.LLMatcher(compiled.tokenizer, _grammar(form, value), log_level=0)
    if matcher.is_error():
        raise ValueError(f"{form} cannot be compiled: {matcher.get_error()}")
    with _lock:
        compiled.matchers[key] = matcher.deep_copy()
        while len(compiled.matchers) > MAX_CACHED_GRAMMARS:
            compiled.matchers.popitem(last=False)
    return matcher


def unpack(masks: np.ndarray, vocab_size: int) -> torch.Tensor:
    """llguidance's bitmasks [rows, words] int32 (bit j of word w: token 32w + j) -> which tokens are
    refused, [rows, vocab_size] bool; one numpy call, as the words' bytes are in order (little-endian)."""
    bits = np.unpackbits(masks.view(np.uint8), axis=1, count=vocab_size, bitorder="little")
    return torch.from_numpy(bits == 0)


def fill_masks(matchers: list[Any], vocab_size: int) -> np.ndarray:
    """The next-token bitmasks [len(matchers), words] of the matchers, written by llguidance in place:
    on its threads (the executor) from PARALLEL_FROM matchers, else one after another."""
    global _executor
    words = (vocab_size + 31) // 32
    masks = np.full((len(matchers), words), -1, dtype=np.int32)
    address, row = masks.ctypes.data, words * 4
    if len(matchers) >= PARALLEL_FROM:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()
        _executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], address, row, len(matchers))
    else:
        for i, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(address + i * row, row)
    return masks


class Structured(LogitsProcessor):
    """Masks the logits [vocab] to the tokens the grammar allows next (see the module docstring)."""

    def __init__(
        self,
        json_schema: dict[str, Any] | None = None,
        json_object: bool | None = None,
        regex: str | None = None,
        choice: list[str] | None = None,
        *,
        tokenizer: Any = None,
        vocab_size: int = 0,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        given = {k: v for k, v in zip(FORMS, (json_schema, json_object, regex, choice), strict=True) if v is not None}
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(FORMS)}")
        if tokenizer is None or not eos_token_ids:
            raise ValueError("structured output needs a model served with its tokenizer and an end-of-sequence token")
        ((form, value),) = given.items()
        self.vocab_size = vocab_size
        self.matcher = _matcher(_compiled(tokenizer, vocab_size, eos_token_ids), form, value)
        self.consumed: list[int] = []
        self.outside = False
        """The last context synced left the grammar: no token can follow it."""
        self._refused: torch.Tensor | None = None  # [vocab] bool, for `self.consumed` as it was prepared
        self._refused_at = -1

    # -- keeping the matcher in step with the sequence ------------------------------------------------
    def sync(self, output_ids: list[int]) -> None:
        """Bring the matcher to `output_ids`: roll back what differs, consume what is new.

        Tokens the grammar refuses (a speculative draft's, which rejection sampling is about to turn
        down) are not consumed: the stage then allows nothing (`outside`), and the matcher stays usable.
        """
        common = len(self.consumed)
        if output_ids[:common] != self.consumed:  # rolled back (rejected drafts): find where they part
            pairs = enumerate(zip(self.consumed, output_ids, strict=False))
            common = next((i for i, (a, b) in pairs if a != b), min(common, len(output_ids)))
        if common < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - common)
            del self.consumed[common:]
        new = output_ids[common:]
        fits = self.matcher.try_consume_tokens(new) if new else 0  # the prefix the grammar allows
        if self.matcher.is_error():
            raise RuntimeError(f"the grammar's matcher failed: {self.matcher.get_error()}")
        self.consumed.extend(new[:fits])
        self.outside = fits < len(new)

    @classmethod
    def prepare_batch(cls, items: list[tuple[Structured, SamplingContext]]) -> None:
        """Compute the masks of many sequences' stages in one call (once per engine step)."""
        for stage, ctx in items:
            stage.sync(ctx.output_ids)
        stages = [stage for stage, _ in items if not stage.outside]
        if not stages:
            return
        refused = unpack(fill_masks([stage.matcher for stage in stages], stages[0].vocab_size), stages[0].vocab_size)
        for i, stage in enumerate(stages):
            stage._refused, stage._refused_at = refused[i], len(stage.consumed)

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        if self._refused_at == len(self.consumed) == len(ctx.output_ids):  # prepared by prepare_batch
            refused = self._refused
        else:
            self.sync(ctx.output_ids)
            if self.outside:
                return torch.full_like(logits, float("-inf"))
            refused = self._refused if self._refused_at == len(self.consumed) else None
            if refused is None:
                refused = unpack(fill_masks([self.matcher], self.vocab_size), self.vocab_size)[0]
        self._refused_at = -1  # a mask serves one call
        assert refused is not None
        if refused.numel() != logits.numel():  # (a slice makes masked_fill take twice as long)
            refused = refused[: logits.numel()]
        return logits.masked_fill(refused, float("-inf"))
