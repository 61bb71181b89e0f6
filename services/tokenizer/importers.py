"""Import existing tokenisers: a tokenizer.json, a Hugging Face tokenizer folder, a SentencePiece .model.

Only data formats are read (JSON, text vocabularies, SentencePiece protobufs); no code is ever
loaded from the imported folder. Every file read is a regular file inside the folder's root (no
device, FIFO or symlink out of it) of at most `max_bytes`, and every regular expression of an
imported pipeline is checked (regex_check.py) before `tokenizers` compiles it.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.implementations import BertWordPieceTokenizer

from libs.common.errors import InvalidArgument, NotFound
from services.tokenizer.regex_check import check_tokenizer_json


@dataclass
class Imported:
    tokenizer: Tokenizer
    format: str
    chat_template: str = ""
    model_max_length: int = 0
    special_tokens: list[str] | None = None


@dataclass(frozen=True)
class Source:
    """Where files may be read from: inside `root`, regular, at most `max_bytes` each."""

    root: Path
    max_bytes: int

    def read(self, path: Path) -> bytes:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise InvalidArgument(f"{path.name} leads outside {self.root}", field="path")
        try:
            info = resolved.stat()
        except OSError:
            raise NotFound(f"{path.name} does not exist", field="path") from None
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"{path.name} is not a regular file", field="path")
        if info.st_size > self.max_bytes:
            raise InvalidArgument(f"{path.name} is larger than {self.max_bytes} bytes", field="path")
        return resolved.read_bytes()


def import_path(path: Path, source: Source) -> Imported:
    if not path.exists():
        raise NotFound(f"{path} does not exist", field="path")
    if path.is_dir():
        return _import_folder(path, source)
    if path.suffix == ".model":
        return _import_sentencepiece(source.read(path))
    return _import_tokenizer_json(source.read(path), "tokenizer.json")


def import_bytes(data: bytes, fmt: str, max_bytes: int) -> Imported:
    if not data:
        raise InvalidArgument("empty", field="data")
    if len(data) > max_bytes:
        raise InvalidArgument(f"{len(data)} bytes; at most {max_bytes}", field="data")
    if fmt in ("", "tokenizer.json"):
        return _import_tokenizer_json(data, "tokenizer.json")
    if fmt == "sentencepiece":
        return _import_sentencepiece(data)
    raise InvalidArgument(f"unknown format {fmt!r}; use 'tokenizer.json' or 'sentencepiece'", field="format")


def _import_tokenizer_json(data: bytes, fmt: str) -> Imported:
    try:
        text = data.decode("utf-8")
        tree = json.loads(text)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidArgument(f"not a valid tokenizer.json: {e}", field="path") from None
    check_tokenizer_json(tree)
    try:
        return Imported(Tokenizer.from_str(text), fmt)
    except Exception as e:  # the library's own parse errors
        raise InvalidArgument(f"not a valid tokenizer.json: {e}", field="path") from None


def _import_sentencepiece(data: bytes) -> Imported:
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_model

        model = spm_model.ModelProto()  # type: ignore[attr-defined]
        model.ParseFromString(data)
    except Exception as e:
        raise InvalidArgument(f"not a SentencePiece model: {e}", field="path") from None
    if not model.pieces:
        raise InvalidArgument("the SentencePiece model has no pieces", field="path")
    specials = [p.piece for p in model.pieces if p.type in (2, 3)]  # UNKNOWN, CONTROL
    unigram = model.trainer_spec.model_type == 1
    tokenizer = _sentencepiece_unigram(model) if unigram else _sentencepiece_bpe(model)
    return Imported(tokenizer, "sentencepiece", special_tokens=specials)


def _sentencepiece_unigram(model: Any) -> Tokenizer:
    """SentencePiece Unigram: the pieces with their log-probabilities."""
    vocab = [(p.piece, p.score) for p in model.pieces]
    tokenizer = Tokenizer(models.Unigram(vocab, model.trainer_spec.unk_id, model.trainer_spec.byte_fallback))
    _sentencepiece_pipeline(tokenizer, model)
    return tokenizer


def _sentencepiece_bpe(model: Any) -> Tokenizer:
    """SentencePiece BPE: a piece's id is its merge rank, so the merges follow from the vocabulary."""
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    ranked = sorted(
        (rank, vocab[piece[:i]], vocab[piece[i:]], piece[:i], piece[i:])
        for piece, rank in vocab.items()
        for i in range(1, len(piece))
        if piece[:i] in vocab and piece[i:] in vocab
    )
    merges = [(left, right) for *_, left, right in ranked]
    unk = model.pieces[model.trainer_spec.unk_id].piece
    bpe = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=model.trainer_spec.byte_fallback)
    tokenizer = Tokenizer(bpe)
    _sentencepiece_pipeline(tokenizer, model)
    return tokenizer


def _sentencepiece_pipeline(tokenizer: Tokenizer, model: Any) -> None:
    """SentencePiece's precompiled normaliser, whitespace folding and '▁' word boundaries."""
    steps: list[Any] = []
    if model.normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.normalizer_spec.precompiled_charsmap))
    if model.normalizer_spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    scheme = "always" if model.normalizer_spec.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)


def _import_folder(path: Path, source: Source) -> Imported:
    config: dict[str, Any] = {}
    if (path / "tokenizer_config.json").exists():
        try:
            config = json.loads(source.read(path / "tokenizer_config.json"))
        except ValueError as e:
            raise InvalidArgument(f"tokenizer_config.json is not valid JSON: {e}", field="path") from None
        if not isinstance(config, dict):
            raise InvalidArgument("tokenizer_config.json must hold an object", field="path")
    if (path / "tokenizer.json").exists():
        imported = _import_tokenizer_json(source.read(path / "tokenizer.json"), "hf-folder")
    elif (path / "vocab.txt").exists():
        source.read(path / "vocab.txt")  # checked: regular, inside, not too large
        bert = BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=bool(config.get("do_lower_case", True)))
        imported = Imported(bert._tokenizer, "hf-folder")
    else:
        models = sorted(path.glob("*.model"))
        if not models:
            raise InvalidArgument(f"{path} holds no tokenizer.json, vocab.txt or .model file", field="path")
        imported = _import_sentencepiece(source.read(models[0]))
    template = config.get("chat_template") or ""
    imported.chat_template = template if isinstance(template, str) else ""
    max_len = config.get("model_max_length") or 0
    imported.model_max_length = int(max_len) if isinstance(max_len, int | float) and max_len < 2**32 else 0
    return imported
