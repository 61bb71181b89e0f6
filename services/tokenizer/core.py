"""The tokeniser service's core: everything it does, as a plain Python class with no transport.

The gRPC servicer is a thin adapter over this class, and tests call it directly too. Methods
raise `libs.common.errors` exceptions for bad input; nothing is written to the store unless the
whole operation succeeds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Encoding

from libs.common.artifacts import ArtifactStore, check_name
from libs.common.errors import AlreadyExists, InvalidArgument
from services.tokenizer import chat, corpus, importers
from services.tokenizer.algorithms import ALGORITHMS, Algorithm
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.store import TokenizerInfo, TokenizerStore
from services.tokenizer.training import JobStatus, TrainingJobs

STRATEGIES = ("longest_first", "only_first", "only_second")
DIRECTIONS = ("right", "left")
MAX_VOCAB = 1 << 21


@dataclass(frozen=True)
class Truncation:
    max_length: int
    stride: int = 0
    strategy: str = "longest_first"
    direction: str = "right"

    def key(self) -> tuple[Any, ...]:
        if self.strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {STRATEGIES}", field="truncation.strategy")
        if self.direction not in DIRECTIONS:
            raise InvalidArgument(f"direction must be one of {DIRECTIONS}", field="truncation.direction")
        return (self.max_length, self.stride, self.strategy, self.direction)


@dataclass(frozen=True)
class Padding:
    length: int = 0
    direction: str = "right"
    pad_to_multiple_of: int = 0

    def key(self) -> tuple[Any, ...]:
        if self.direction not in DIRECTIONS:
            raise InvalidArgument(f"direction must be one of {DIRECTIONS}", field="padding.direction")
        return (self.length, self.direction, self.pad_to_multiple_of)


@dataclass(frozen=True)
class VocabRow:
    vocab_size: int
    actual_vocab_size: int
    heldout_tokens: int
    tokens_per_char: float
    tokens_per_byte: float
    chars_per_token: float
    embedding_params: int
    embedding_bytes: int
    training_seconds: float


class TokenizerCore:
    def __init__(self, config: TokenizerConfig, artifacts: ArtifactStore) -> None:
        self.config = config
        self.artifacts = artifacts
        self.tokenizers = TokenizerStore(artifacts, config.cache_size)
        self.jobs = TrainingJobs(self.tokenizers, max_running=config.max_training_jobs)
        self.chat_limits = chat.Limits(
            config.max_chat_template_chars, config.max_text_bytes, config.chat_render_seconds
        )

    # -- training ----------------------------------------------------------------------------
    def train(
        self,
        name: str,
        algorithm: str,
        vocab_size: int,
        corpus_refs: Sequence[str] = (),
        texts: Sequence[str] = (),
        special_tokens: Sequence[str] = (),
        min_frequency: int = 0,
        normalizer: str = "",
        pre_tokenizer: str = "",
        chat_template: str = "",
        params: dict[str, Any] | None = None,
        model_max_length: int = 0,
    ) -> JobStatus:
        """Check everything, then start training in the background; returns the queued job."""
        check_name(name)
        if chat_template == "default":
            chat_template = chat.CHATML
            special_tokens = list(
                special_tokens or ALGORITHMS.get(algorithm or "?", field="algorithm").default_special_tokens
            )
            special_tokens += [t for t in chat.CHATML_TOKENS if t not in special_tokens]
        if chat_template:
            chat.compile_template(chat_template, self.chat_limits)
        spec = {
            "type": algorithm,
            "vocab_size": vocab_size,
            "special_tokens": list(special_tokens),
            "min_frequency": min_frequency,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            **(params or {}),
        }
        built: Algorithm = ALGORITHMS.create(spec, field="algorithm")
        if vocab_size > MAX_VOCAB:
            raise InvalidArgument(f"at most {MAX_VOCAB}", field="vocab_size")
        files = corpus.resolve(self.artifacts, corpus_refs)
        stats = corpus.check(self.artifacts, files, list(texts), alphabet=not built.byte_level)
        self._check_vocab_size(built, stats.alphabet)
        meta = {
            "algorithm": algorithm,
            "normalizer": built.normalizer_name,
            "pre_tokenizer": built.pre_tokenizer_name,
            "source": "trained",
            "corpus": list(corpus_refs),
            "corpus_bytes": stats.bytes,
            "requested_vocab_size": vocab_size,
            "model_max_length": model_max_length,
        }
        try:
            return self.jobs.submit(name, spec, stats.files, list(texts), meta, chat_template)
        except AlreadyExists:
            raise AlreadyExists(f"tokenizer {name!r} is already being trained", field="name") from None

    @staticmethod
    def _check_vocab_size(algorithm: Algorithm, alphabet: set[str]) -> None:
        normalizer = algorithm.pipeline().normalizer
        if normalizer is not None:
            alphabet = set("".join(normalizer.normalize_str(c) for c in alphabet)) - {" "}
        needed = algorithm.min_vocab_size(alphabet)
        if algorithm.vocab_size < needed:
            what = "256 bytes" if algorithm.byte_level else f"{len(alphabet)} distinct characters"
            raise InvalidArgument(
                f"{algorithm.vocab_size} is smaller than the alphabet ({what} + "
                f"{len(algorithm.special_tokens)} special tokens = {needed})",
                field="vocab_size",
            )

    def training_status(self, job_id: str) -> JobStatus:
        return self.jobs.get(job_id)

    def cancel_training(self, job_id: str) -> JobStatus:
        return self.jobs.cancel(job_id)

    def watch_training(self, job_id: str) -> AsyncIterator[JobStatus]:
        return self.jobs.watch(job_id)

    async def upload_corpus(self, chunks: AsyncIterator[tuple[str, str, bool]]) -> tuple[str, int, int]:
        return await corpus.upload(self.artifacts, chunks)

    # -- import, list, describe, delete --------------------------------------------------------
    def import_tokenizer(
        self, name: str, path: str = "", data: bytes = b"", fmt: str = "", chat_template: str = ""
    ) -> TokenizerInfo:
        check_name(name)
        if bool(path) == bool(data):
            raise InvalidArgument("give exactly one of path or data", field="path")
        if path:
            imported = importers.import_path(*self._import_source(path))
        else:
            imported = importers.import_bytes(data, fmt, self.config.max_import_bytes)
        imported.tokenizer.no_padding()  # stored tokenisers carry no per-call settings;
        imported.tokenizer.no_truncation()  # callers ask for them per request
        template = chat_template or imported.chat_template
        if template:
            chat.compile_template(template, self.chat_limits)
        meta = {
            "algorithm": type(imported.tokenizer.model).__name__.lower(),
            "source": f"imported:{imported.format}",
            "model_max_length": imported.model_max_length,
        }
        if imported.special_tokens is not None:
            meta["special_tokens"] = imported.special_tokens
        return self.tokenizers.save(name, imported.tokenizer, meta, template)

    def _import_source(self, path: str) -> tuple[Path, importers.Source]:
        """A path in the artifact store, or an absolute one inside an operator's import root."""
        limit = self.config.max_import_bytes
        if not Path(path).is_absolute():
            return self.artifacts.path(path), importers.Source(self.artifacts.root, limit)
        resolved = Path(path).resolve()
        for root in map(Path, self.config.import_roots):
            if resolved.is_relative_to(root.resolve()):
                return resolved, importers.Source(root, limit)
        raise InvalidArgument(
            "absolute paths are not read over RPC: send the file's bytes (data), give a path in the artifact "
            "store, or have the operator allow a folder (LLMP_TOKENIZER_IMPORT_ROOTS)",
            field="path",
        )

    def list_tokenizers(self, prefix: str = "") -> list[TokenizerInfo]:
        return self.tokenizers.list_tokenizers(prefix)

    def describe(self, ref: str) -> TokenizerInfo:
        return self.tokenizers.describe(ref)

    def delete(self, ref: str) -> list[str]:
        name = ref.partition(":")[0]
        if any(self.jobs.get(j).name == name for j in self.jobs.running()):
            raise AlreadyExists(f"tokenizer {name!r} is being trained; cancel the job first", field="tokenizer")
        return self.tokenizers.delete(ref)

    # -- encode and decode --------------------------------------------------------------------
    def _check_texts(self, texts: Sequence[str], field: str) -> None:
        if len(texts) > self.config.max_batch:
            raise InvalidArgument(f"{len(texts)} items exceed the batch limit of {self.config.max_batch}", field=field)
        limit = self.config.max_text_bytes
        for i, text in enumerate(texts):
            if len(text) > limit // 4 and len(text.encode()) > limit:
                raise InvalidArgument(
                    f"text of {len(text.encode())} bytes exceeds the limit of {limit}", field=f"{field}[{i}]"
                )

    def encode_batch(
        self,
        ref: str,
        texts: Sequence[str],
        pairs: Sequence[str] = (),
        add_special_tokens: bool = True,
        truncation: Truncation | None = None,
        padding: Padding | None = None,
    ) -> list[Encoding]:
        self._check_texts(texts, "texts")
        self._check_texts(pairs, "pairs")
        if pairs and len(pairs) != len(texts):
            raise InvalidArgument(f"{len(pairs)} pairs for {len(texts)} texts", field="pairs")
        self._check_output(texts, pairs, truncation, padding)
        loaded = self.tokenizers.load(ref, truncation.key() if truncation else None, padding.key() if padding else None)
        inputs: list[Any] = list(zip(texts, pairs, strict=True)) if pairs else list(texts)
        try:
            return loaded.tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)
        except Exception as e:  # e.g. truncation that cannot fit the special tokens
            raise InvalidArgument(f"cannot encode: {e}", field="truncation") from None

    def _check_output(
        self, texts: Sequence[str], pairs: Sequence[str], truncation: Truncation | None, padding: Padding | None
    ) -> None:
        """Refuse padding and overflow windows that would make more than the configured output.

        A text has at most one token per UTF-8 byte (plus special tokens), which bounds the windows
        truncation with a stride can cut it into before anything is encoded."""
        most = self.config.max_output_tokens
        if padding is not None:
            if padding.length > most or padding.pad_to_multiple_of > most:
                raise InvalidArgument(f"at most {most}", field="padding.length")
            if padding.length * len(texts) > most:
                raise InvalidArgument(
                    f"{len(texts)} texts padded to {padding.length} exceed {most} tokens", field="padding.length"
                )
        if truncation is not None and truncation.max_length:
            step = max(1, truncation.max_length - truncation.stride)
            tokens = sum(len(t.encode()) for t in [*texts, *pairs])
            windows = tokens // step + len(texts)
            if windows > self.config.max_overflow_windows:
                raise InvalidArgument(
                    f"up to {windows} overflow windows of {truncation.max_length} tokens with stride "
                    f"{truncation.stride}; at most {self.config.max_overflow_windows}",
                    field="truncation.max_length",
                )

    def encode(self, ref: str, text: str, pair: str = "", **options: Any) -> Encoding:
        return self.encode_batch(ref, [text], [pair] if pair else [], **options)[0]

    def count_tokens(self, ref: str, texts: Sequence[str], add_special_tokens: bool = True) -> list[int]:
        return [len(e.ids) for e in self.encode_batch(ref, texts, add_special_tokens=add_special_tokens)]

    def decode_batch(self, ref: str, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        if len(sequences) > self.config.max_batch:
            raise InvalidArgument(
                f"{len(sequences)} sequences exceed the batch limit of {self.config.max_batch}", field="sequences"
            )
        loaded = self.tokenizers.load(ref)
        size = loaded.tokenizer.get_vocab_size(with_added_tokens=True)
        for i, ids in enumerate(sequences):
            bad = next((t for t in ids if t >= size), None)
            if bad is not None:
                raise InvalidArgument(f"token id {bad} is outside the vocabulary (size {size})", field=f"ids[{i}]")
        return loaded.tokenizer.decode_batch([list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    def decode(self, ref: str, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.decode_batch(ref, [ids], skip_special_tokens)[0]

    def apply_chat_template(
        self, ref: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[str, list[int]]:
        loaded = self.tokenizers.load(ref)
        text = chat.render(loaded.info.chat_template, messages, add_generation_prompt, loaded.roles, self.chat_limits)
        return text, loaded.tokenizer.encode(text, add_special_tokens=False).ids

    # -- the vocabulary-size trade-off ---------------------------------------------------------
    def vocab_report(
        self,
        corpus_refs: Sequence[str],
        texts: Sequence[str],
        algorithm: str,
        vocab_sizes: Sequence[int],
        embedding_dim: int = 4096,
        bytes_per_param: int = 2,
        holdout_fraction: float = 0.1,
    ) -> Iterator[VocabRow]:
        """Train one tokeniser per size on most of the corpus; measure compression on the rest."""
        if not vocab_sizes or len(vocab_sizes) > 16:
            raise InvalidArgument("give between 1 and 16 sizes", field="vocab_sizes")
        if max(vocab_sizes) > MAX_VOCAB:
            raise InvalidArgument(f"at most {MAX_VOCAB}", field="vocab_sizes")
        if not 0 < holdout_fraction < 1:
            raise InvalidArgument("must be in (0, 1)", field="holdout_fraction")
        stats = corpus.check(self.artifacts, corpus.resolve(self.artifacts, corpus_refs), list(texts))
        if stats.bytes * len(vocab_sizes) > self.config.max_report_bytes:
            raise InvalidArgument(
                f"{len(vocab_sizes)} tokenisers on {stats.bytes} bytes each exceed {self.config.max_report_bytes} "
                "bytes of training (LLMP_TOKENIZER_MAX_REPORT_BYTES): fewer sizes or a smaller corpus",
                field="vocab_sizes",
            )
        algorithms = [
            ALGORITHMS.create({"type": algorithm or "byte_level_bpe", "vocab_size": v}, field="algorithm")
            for v in vocab_sizes
        ]
        for a in algorithms:
            self._check_vocab_size(a, stats.alphabet)
        lines = [ln for p in stats.files for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        lines += [ln for t in texts for ln in t.splitlines() if ln.strip()]
        every = max(2, round(1 / holdout_fraction))
        heldout = lines[::every]
        training = [ln for i, ln in enumerate(lines) if i % every]
        held_chars = sum(len(s) for s in heldout)
        held_bytes = sum(len(s.encode()) for s in heldout)
        for built in algorithms:
            start = time.perf_counter()
            tokenizer = built.pipeline()
            tokenizer.train_from_iterator(training, built.trainer())
            built.finish(tokenizer)
            seconds = time.perf_counter() - start
            tokens = sum(len(e.ids) for e in tokenizer.encode_batch(heldout, add_special_tokens=False))
            actual = tokenizer.get_vocab_size(with_added_tokens=True)
            yield VocabRow(
                vocab_size=built.vocab_size,
                actual_vocab_size=actual,
                heldout_tokens=tokens,
                tokens_per_char=tokens / max(1, held_chars),
                tokens_per_byte=tokens / max(1, held_bytes),
                chars_per_token=held_chars / max(1, tokens),
                embedding_params=actual * embedding_dim,
                embedding_bytes=actual * embedding_dim * bytes_per_param,
                training_seconds=seconds,
            )

    async def drain(self) -> None:
        await self.jobs.drain(self.config.drain_seconds)
