"""Tokenisers in the artifact store: versioned folders that Hugging Face libraries load as they are.

    tokenizers/<name>/<version>/
        tokenizer.json          the whole pipeline (Hugging Face `tokenizers` format)
        tokenizer_config.json   special-token roles, model_max_length, chat_template (transformers)
        llmp.json               how it was made: algorithm, corpus size, timings, sha256

Loaded tokenisers are kept in an LRU cache; a variant with truncation/padding settings is a
separate cached copy, so calls with different settings never share mutable state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Any

from tokenizers import Tokenizer

from libs.common.artifacts import ArtifactStore, Ref, check_name
from libs.common.errors import InvalidArgument, NotFound
from services.tokenizer.algorithms import special_token_roles

KIND = "tokenizers"


@dataclasses.dataclass
class TokenizerInfo:
    name: str
    version: int
    ref: str
    algorithm: str
    vocab_size: int
    special_tokens: list[str]
    normalizer: str
    pre_tokenizer: str
    has_chat_template: bool
    source: str
    created_at: str
    corpus_bytes: int
    training_seconds: float
    sha256: str
    model_max_length: int
    chat_template: str
    path: str


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A tokeniser ready to use, with what the service needs to know about it."""

    info: TokenizerInfo
    tokenizer: Tokenizer
    roles: dict[str, str]


class TokenizerStore:
    def __init__(self, store: ArtifactStore, cache_size: int = 16) -> None:
        self.store = store
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Any, ...], Loaded] = OrderedDict()
        self._lock = threading.Lock()

    # -- writing -----------------------------------------------------------------------------
    def save(self, name: str, tokenizer: Tokenizer, meta: dict[str, Any], chat_template: str = "") -> TokenizerInfo:
        """Write a new version atomically and return its description."""
        check_name(name)
        text = tokenizer.to_str()
        special = meta.get("special_tokens") or [
            t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special
        ]
        roles = special_token_roles(special)
        with self.store.lock(f"{KIND}-{name}-versions"):
            version = self.store.next_version(KIND, name)
            with self.store.staging(f"{KIND}/{name}/{version}") as tmp:
                (tmp / "tokenizer.json").write_text(text)
                hf_config = {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "model_max_length": meta.get("model_max_length") or 1_000_000_000_000_000_019_884_624_838_656,
                    **roles,
                }
                if chat_template:
                    hf_config["chat_template"] = chat_template
                (tmp / "tokenizer_config.json").write_text(json.dumps(hf_config, indent=2))
                record = {
                    **meta,
                    "name": name,
                    "version": version,
                    "special_tokens": special,
                    "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sha256": hashlib.sha256(text.encode()).hexdigest(),
                }
                (tmp / "llmp.json").write_text(json.dumps(record, indent=2))
        return self.describe(f"{name}:{version}")

    def delete(self, ref: str) -> list[str]:
        """Delete one version ("name:3") or all of them ("name")."""
        name, _, version = ref.partition(":")
        if version:
            target = self.store.resolve(KIND, ref, field="tokenizer")
            self.store.delete(f"{KIND}/{name}/{target.version}")
            deleted = [target.id]
        else:
            check_name(name, "tokenizer")
            versions = self.store.versions(KIND, name)
            if not versions:
                raise NotFound(f"no tokenizer named {name!r}", field="tokenizer")
            self.store.delete(f"{KIND}/{name}")
            deleted = [f"{name}:{v}" for v in versions]
        with self._lock:
            for key in [k for k in self._cache if k[0] in deleted]:
                del self._cache[key]
        return deleted

    # -- reading -----------------------------------------------------------------------------
    def resolve(self, ref: str) -> Ref:
        if not ref:
            raise InvalidArgument("a tokenizer reference is required ('name' or 'name:version')", field="tokenizer")
        return self.store.resolve(KIND, ref, field="tokenizer")

    def describe(self, ref: str) -> TokenizerInfo:
        return self._info(self.resolve(ref))

    def _info(self, ref: Ref) -> TokenizerInfo:
        meta = json.loads((ref.path / "llmp.json").read_text())
        hf_config = json.loads((ref.path / "tokenizer_config.json").read_text())
        chat_template = hf_config.get("chat_template") or ""
        max_len = int(hf_config.get("model_max_length") or 0)
        return TokenizerInfo(
            name=ref.name,
            version=ref.version,
            ref=ref.id,
            algorithm=meta.get("algorithm", ""),
            vocab_size=int(meta["vocab_size"]),
            special_tokens=list(meta.get("special_tokens", [])),
            normalizer=meta.get("normalizer", ""),
            pre_tokenizer=meta.get("pre_tokenizer", ""),
            has_chat_template=bool(chat_template),
            source=meta.get("source", "trained"),
            created_at=meta.get("created_at", ""),
            corpus_bytes=int(meta.get("corpus_bytes", 0)),
            training_seconds=float(meta.get("training_seconds", 0.0)),
            sha256=meta.get("sha256", ""),
            model_max_length=max_len if max_len < 2**32 else 0,
            chat_template=chat_template,
            path=self.store.relative(ref.path),
        )

    def list_tokenizers(self, prefix: str = "") -> list[TokenizerInfo]:
        out: list[TokenizerInfo] = []
        for name in self.store.names(KIND):
            if name.startswith(prefix):
                out.extend(self._info(self.store.resolve(KIND, f"{name}:{v}")) for v in self.store.versions(KIND, name))
        return out

    def load(
        self, ref: str, truncation: tuple[Any, ...] | None = None, padding: tuple[Any, ...] | None = None
    ) -> Loaded:
        """The tokeniser for `ref`, configured with (max_length, stride, strategy, direction) truncation
        and (length, direction, pad_to_multiple_of) padding when given."""
        resolved = self.resolve(ref)
        key = (resolved.id, truncation, padding)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        base = self.load(resolved.id) if truncation or padding else None
        loaded = self._configure(base, truncation, padding) if base else self._read(resolved)
        with self._lock:
            self._cache[key] = loaded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return loaded

    def _read(self, ref: Ref) -> Loaded:
        info = self._info(ref)
        tokenizer = Tokenizer.from_file(str(ref.path / "tokenizer.json"))
        hf_config = json.loads((ref.path / "tokenizer_config.json").read_text())
        roles = {k: v for k, v in hf_config.items() if k.endswith("_token") and isinstance(v, str)}
        return Loaded(info, tokenizer, roles)

    @staticmethod
    def _configure(base: Loaded, truncation: tuple[Any, ...] | None, padding: tuple[Any, ...] | None) -> Loaded:
        tokenizer = Tokenizer.from_str(base.tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if truncation:
            max_length, stride, strategy, direction = truncation
            if stride >= max_length - tokenizer.num_special_tokens_to_add(False):
                raise InvalidArgument("stride must be smaller than max_length minus special tokens", field="truncation")
            tokenizer.enable_truncation(max_length, stride=stride, strategy=strategy, direction=direction)
        if padding:
            length, direction, multiple = padding
            pad = base.roles.get("pad_token")
            if pad is None or tokenizer.token_to_id(pad) is None:
                raise InvalidArgument(f"tokenizer {base.info.ref} has no pad token", field="padding")
            tokenizer.enable_padding(
                direction=direction,
                pad_id=tokenizer.token_to_id(pad),
                pad_token=pad,
                length=length or None,
                pad_to_multiple_of=multiple or None,
            )
        return Loaded(base.info, tokenizer, base.roles)
