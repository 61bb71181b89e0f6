"""Continuous batching: which sequences compute which tokens in the next step.

Prefill and decode are one thing here: a sequence has `token_ids` (prompt and output so far) and
`num_computed` of them in the KV cache; each step computes a chunk of the rest, and when the chunk
reaches the end the next token is sampled. A decoding sequence has one token left; a new one has
its whole prompt (less what the prefix cache already holds).

Each step, under a token budget: every decoding sequence first (one token each), then the
remaining budget goes to chunks of unfinished prompts, running ones before waiting ones, so a long
prompt is spread over several steps instead of stalling everyone's decoding. Sequences join and
leave between steps. When the cache has no block for a decoding sequence, the most recently
arrived running sequence is preempted: its blocks are freed and it goes back to the head of the
queue, to be recomputed later (cheaply, since its full blocks stay in the prefix cache).

Beam search forks sequences: a new beam shares its parent's cache blocks (`fork`), and a beam
that has computed everything waits, unscheduled, until its siblings' logits are in.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from libs.common.errors import ResourceExhausted
from services.inference.engine.batch import StepChunk
from services.inference.engine.kv_cache import KVCache

_arrival = itertools.count()


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    """Sequences in the running batch at most."""
    max_num_batched_tokens: int = 512
    """Tokens computed per step at most (the prefill chunk budget)."""
    max_waiting: int = 256
    """Sequences waiting at most; more are refused with RESOURCE_EXHAUSTED."""


@dataclass(eq=False)
class Sequence:
    """One generated stream (a request with n > 1 has n of them)."""

    seq_id: str
    request_id: str
    token_ids: list[int]
    prompt_len: int
    num_computed: int = 0
    num_cached: int = 0
    """Prompt tokens taken from the prefix cache at admission."""
    arrival: int = field(default_factory=lambda: next(_arrival))
    cache_salt: bytes = b""
    """Separates this sequence's prefix-cache entries from equal tokens computed otherwise (an adapter)."""

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def remaining(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass
class ScheduledStep:
    chunks: list[StepChunk]
    sequences: list[Sequence]
    """The sequence of each chunk, in the same order."""
    aborted: list[Sequence]


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache) -> None:
        self.config = config
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._abort: set[str] = set()
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._abort)

    def add(self, sequences: list[Sequence]) -> None:
        """Queue a request's sequences, all or none."""
        if len(self.waiting) + len(sequences) > self.config.max_waiting:
            raise ResourceExhausted(f"the queue is full ({self.config.max_waiting} sequences waiting)")
        self.waiting.extend(sequences)

    def abort(self, request_id: str) -> None:
        """Drop the request's sequences at the start of the next step."""
        self._abort.add(request_id)

    def finish(self, seq: Sequence) -> None:
        (self.running if seq in self.running else self.waiting).remove(seq)
        self.cache.free(seq.seq_id)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Add `child`, which continues `parent`'s tokens (a new beam), sharing its computed cache.

        Without room in the batch or for the copy of a partial block, the child waits at the head of
        the queue and is recomputed (its full prompt blocks still come from the prefix cache).
        """
        if (
            parent in self.running
            and self._batch_size() < self.config.max_num_seqs
            and self.cache.fork(parent.seq_id, child.seq_id, parent.num_computed)
        ):
            child.num_computed = parent.num_computed
            self.running.append(child)
        else:
            self.waiting.appendleft(child)

    def schedule(self) -> ScheduledStep:
        aborted = self._take_aborted()
        budget = self.config.max_num_batched_tokens
        step = ScheduledStep([], [], aborted)
        for seq in sorted(self.running, key=lambda s: (s.remaining > 1, s.arrival)):
            if budget == 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            if seq.remaining == 0:  # a beam whose siblings have not produced their logits yet
                continue
            if seq.remaining == 1 and not self._make_room(seq):
                continue
            n = min(seq.remaining, budget)
            if seq.remaining > 1 and not self.cache.can_allocate(seq.seq_id, seq.num_computed + n):
                continue
            budget -= self._add_chunk(step, seq, n)
        while self.waiting and budget > 0 and self._batch_size() < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break
            self.waiting.popleft()
            self.running.append(seq)
            budget -= self._add_chunk(step, seq, min(seq.remaining, budget))
        return step

    def advance(self, step: ScheduledStep) -> None:
        """Record that the step's chunks are in the cache, registering blocks that became full."""
        for chunk, seq in zip(step.chunks, step.sequences, strict=True):
            seq.num_computed += len(chunk.token_ids)
            self.cache.commit(seq.seq_id, seq.token_ids, seq.num_computed, seq.cache_salt)
            self.cache.slide(seq.seq_id, seq.num_computed)

    def accept(self, seq: Sequence, num_tokens: int) -> None:
        """Count verified draft tokens as computed: the step that verified them wrote their KV."""
        seq.num_computed += num_tokens
        self.cache.commit(seq.seq_id, seq.token_ids, seq.num_computed, seq.cache_salt)
        self.cache.slide(seq.seq_id, seq.num_computed)

    def _batch_size(self) -> int:
        """Running sequences that take part in steps: a waiting beam must not hold a place its sibling needs."""
        return sum(s.remaining > 0 for s in self.running)

    def _add_chunk(self, step: ScheduledStep, seq: Sequence, n: int) -> int:
        self.cache.allocate(seq.seq_id, seq.num_computed + n)
        start = seq.num_computed
        sample = start + n == len(seq.token_ids)
        step.chunks.append(StepChunk(seq.seq_id, seq.token_ids[start : start + n], start, sample))
        step.sequences.append(seq)
        return n

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Share cached prefix blocks and check that the first chunk fits; undo the sharing if not."""
        if seq.num_computed == 0:
            seq.num_computed = seq.num_cached = self.cache.match_prefix(seq.seq_id, seq.token_ids, seq.cache_salt)
        if self.cache.can_allocate(seq.seq_id, seq.num_computed + min(seq.remaining, budget)):
            return True
        self.cache.free(seq.seq_id)
        seq.num_computed = seq.num_cached = 0
        return False

    def _make_room(self, seq: Sequence) -> bool:
        """Preempt the newest running sequences until `seq` can grow by a token; False if it was itself."""
        while not self.cache.can_allocate(seq.seq_id, seq.num_computed + 1):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        seq.num_computed = 0
        self.waiting.appendleft(seq)

    def _take_aborted(self) -> list[Sequence]:
        if not self._abort:
            return []
        gone = [s for s in (*self.running, *self.waiting) if s.request_id in self._abort]
        for seq in gone:
            if seq in self.running:
                self.running.remove(seq)
            else:
                self.waiting.remove(seq)
            self.cache.free(seq.seq_id)
        self._abort.clear()
        return gone
