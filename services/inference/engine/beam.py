"""Beam search for one request, run by the engine inside continuous batching (its `Decoding`).

Each live beam is a scheduler `Sequence` with its own block table. A step's forward pass gives
every live beam its next-token logits (a beam that gets them early waits for its siblings); then
`BeamSearch.add` ranks all continuations at once and says how the beams change: a beam with one
continuation is extended in place, one with several forks the others (`Scheduler.fork`, which
shares the cached prompt and output blocks by reference count), one with none is dropped.

The ranking reproduces `transformers`' `generate(num_beams=k, do_sample=False)`: the 2k best
continuations by summed log-probability (more with several stop tokens); those among the top k
that end (a stop token or the length limit) become finished hypotheses scored
sum_logprobs / generated_len ** length_penalty; the k best that do not end stay live; and the
search stops by transformers' `early_stopping` rule (True: k hypotheses; False: the heuristic that
the best live beam at its current length cannot beat the worst hypothesis; "never": the same at
the longest length when length_penalty > 0).

`BeamDecoding` is the request's strategy (decoding.py): it feeds the search and applies each
selection to the batch through the engine's `DecodingHost` (drop, fork, end).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from libs.common.errors import InvalidArgument
from services.inference.engine.decoding import Decoding, DecodingHost, RequestState
from services.inference.engine.sampling import SamplingParams
from services.inference.engine.scheduler import Sequence


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam."""

    token_ids: list[int]
    """Generated tokens, the stop token included."""
    score: float
    finish_reason: str
    """"stop" or "length"."""


@dataclass
class BeamStep:
    """How the live beams changed in one selection; extended beams already hold their new token."""

    dropped: list[Sequence] = field(default_factory=list)
    """Beams without a continuation (all of them once the search is done): free them."""
    forked: list[tuple[Sequence, Sequence]] = field(default_factory=list)
    """(parent, child): a new beam continuing the parent's tokens before this step with another token."""


class BeamSearch:
    """The state of one request's search: live beams, their scores, finished hypotheses."""

    def __init__(self, first: Sequence, params: SamplingParams, stop_ids: set[int], max_new_tokens: int) -> None:
        self.width = params.beam_width
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        self.stop_ids = stop_ids
        self.max_new_tokens = max_new_tokens
        self.candidates = max(2, 1 + len(stop_ids)) * self.width
        self.live: list[Sequence] = [first]
        self.scores = torch.zeros(1)  # [live] summed log-probabilities, best first
        self.finished: list[Hypothesis] = []  # best first, at most `width`
        self.improvable = True
        self.done = False
        self._logits: dict[str, torch.Tensor] = {}
        self._ids = itertools.count(1)

    def add(self, seq: Sequence, logits: torch.Tensor) -> BeamStep | None:
        """Take one live beam's logits [vocab]; once every live beam has given them, select and return the step."""
        self._logits[seq.seq_id] = logits.float().cpu()
        if len(self._logits) < len(self.live):
            return None
        rows = torch.stack([self._logits.pop(s.seq_id) for s in self.live])  # [live, vocab]
        return self._select(rows)

    def _select(self, logits: torch.Tensor) -> BeamStep:
        generated = len(self.live[0].output_ids) + 1  # tokens of every candidate, its new one included
        totals = (logits.log_softmax(-1) + self.scores[:, None]).flatten()  # [live * vocab]
        top, index = totals.topk(min(self.candidates, totals.numel()))  # best first
        vocab = logits.shape[1]
        parents, tokens = (index // vocab).tolist(), (index % vocab).tolist()
        at_limit = generated >= self.max_new_tokens
        ends = [at_limit or t in self.stop_ids for t in tokens]
        self._collect_finished(top, parents, tokens, ends, generated)
        running = [i for i, end in enumerate(ends) if not end][: self.width]
        if running:
            self.scores = top[running]
            self._check_improvable(generated)
        full = len(self.finished) == self.width
        self.done = not running or not self.improvable or (self.early_stopping is True and full)
        if self.done:
            step, self.live = BeamStep(dropped=list(self.live)), []
            return step
        return self._advance([(parents[i], tokens[i]) for i in running])

    def _collect_finished(
        self, top: torch.Tensor, parents: list[int], tokens: list[int], ends: list[bool], generated: int
    ) -> None:
        """Keep the best `width` hypotheses, adding the ending candidates among the top `width`."""
        new = [
            Hypothesis(
                [*self.live[parents[i]].output_ids, tokens[i]],
                float(top[i]) / generated**self.length_penalty,
                "stop" if tokens[i] in self.stop_ids else "length",
            )
            for i in range(min(self.width, len(ends)))
            if ends[i]
        ]
        self.finished = sorted(self.finished + new, key=lambda h: -h.score)[: self.width]

    def _check_improvable(self, generated: int) -> None:
        """transformers' heuristic: can the best live beam still beat the worst of `width` hypotheses?"""
        if len(self.finished) < self.width:
            return
        never = self.early_stopping == "never" and self.length_penalty > 0
        length = self.max_new_tokens if never else generated
        self.improvable = float(self.scores[0]) / length**self.length_penalty > self.finished[-1].score

    def _advance(self, chosen: list[tuple[int, int]]) -> BeamStep:
        """chosen: (parent index, token) of the new live beams, best first."""
        step = BeamStep()
        extended: dict[int, int] = {}  # parent index -> its token, for the first child of each parent
        live = []
        for parent_index, token in chosen:
            parent = self.live[parent_index]
            if parent_index not in extended:
                extended[parent_index] = token
                live.append(parent)
                continue
            child_id = f"{parent.request_id}/{next(self._ids)}"
            child = Sequence(
                child_id,
                parent.request_id,
                [*parent.token_ids, token],
                parent.prompt_len,
                arrival=parent.arrival,
                cache_salt=parent.cache_salt,
            )
            step.forked.append((parent, child))
            live.append(child)
        for parent_index, token in extended.items():  # after the forks copied the parents' tokens
            self.live[parent_index].token_ids.append(token)
        step.dropped = [s for i, s in enumerate(self.live) if i not in extended]
        self.live = live
        return step

    def discard(self, seq: Sequence) -> None:
        """Forget a beam taken away from outside (an abort, perhaps after a failed selection)."""
        if seq in self.live:
            self.live.remove(seq)
        self._logits.pop(seq.seq_id, None)


class BeamDecoding(Decoding):
    """Beam search as a request's decoding strategy: its live beams are sequences of the batch."""

    def __init__(self, search: BeamSearch) -> None:
        self.search = search

    def append(
        self, host: DecodingHost, request: RequestState, index: int, seq: Sequence, logits: torch.Tensor, argmax: int
    ) -> None:
        """Hand a beam's logits [vocab] to the search; apply its selection once all live beams have them."""
        step = self.search.add(seq, logits)
        if step is None:
            return
        for old in step.dropped:  # first, so that their blocks are free for the forks' copies
            host.drop(old)
        for parent, child in step.forked:
            host.fork(request, parent, child)
        if self.search.done:
            best = self.search.finished
            host.end(request, [h.finish_reason for h in best], [list(h.token_ids) for h in best])

    def remove(
        self, host: DecodingHost, request: RequestState, index: int, seq: Sequence, reason: str, free: bool
    ) -> None:
        """Only an abort (or a failure) ends a beam from outside the search."""
        self.search.discard(seq)
        if not self.search.live:
            host.end(request, [reason] * request.params.n)


def check_beams(prompt_len: int, params: SamplingParams, block_size: int, num_blocks: int, speculative: bool) -> None:
    """Refuse a beam search the engine cannot run, naming the field."""
    if speculative:
        raise InvalidArgument("beam search does not run with speculative decoding", field="beam_width")
    # Every beam at full length must fit at once, or beams could only advance by evicting each other.
    blocks_per_beam = -(-(prompt_len + params.max_tokens) // block_size)
    if params.beam_width * blocks_per_beam > num_blocks:
        raise InvalidArgument(
            f"{params.beam_width} beams of {prompt_len + params.max_tokens} tokens do not fit the KV cache",
            field="beam_width",
        )
