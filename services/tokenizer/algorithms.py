"""Tokeniser algorithms as plugins (group `llmp.tokenizers`), each a recipe over Hugging Face `tokenizers`.

An algorithm turns training options into an untrained `tokenizers.Tokenizer` pipeline
(normaliser -> pre-tokeniser -> model -> post-processor -> decoder) and its trainer. A third
party adds one by subclassing `Algorithm` and declaring an entry point in `llmp.tokenizers`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from libs.common.errors import InvalidArgument
from libs.common.plugins import Registry

NORMALIZERS = {
    "none": lambda: None,
    "nfc": normalizers.NFC,
    "nfd": normalizers.NFD,
    "nfkc": normalizers.NFKC,
    "nfkd": normalizers.NFKD,
    "lowercase": lambda: normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()]),
    "bert": lambda: normalizers.BertNormalizer(lowercase=True),
    "bert_cased": lambda: normalizers.BertNormalizer(lowercase=False),
}

PRE_TOKENIZERS = {
    "whitespace": pre_tokenizers.Whitespace,
    "byte_level": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "metaspace": pre_tokenizers.Metaspace,
    "bert": pre_tokenizers.BertPreTokenizer,
    "digits": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    ),
}

# Special-token roles recognised by name, for the HF tokenizer_config.json and chat templates.
ROLE_NAMES = {
    "bos_token": ("<s>", "<bos>", "<|begin_of_text|>", "[CLS]"),
    "eos_token": ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "[SEP]"),
    "unk_token": ("<unk>", "[UNK]"),
    "pad_token": ("<pad>", "[PAD]"),
    "mask_token": ("<mask>", "[MASK]"),
    "cls_token": ("[CLS]",),
    "sep_token": ("[SEP]",),
}


def special_token_roles(special_tokens: list[str]) -> dict[str, str]:
    roles: dict[str, str] = {}
    for role, names in ROLE_NAMES.items():
        for name in names:
            if name in special_tokens:
                roles[role] = name
                break
    return roles


class Algorithm:
    """A tokeniser recipe. Subclasses set the defaults and build the pipeline."""

    name: ClassVar[str] = ""
    default_special_tokens: ClassVar[list[str]] = []
    default_normalizer: ClassVar[str] = "nfc"
    default_pre_tokenizer: ClassVar[str] = "whitespace"
    #: Byte-level algorithms need no character alphabet: every byte is a token already.
    byte_level: ClassVar[bool] = False

    def __init__(
        self,
        vocab_size: int,
        special_tokens: list[str] | None = None,
        min_frequency: int = 0,
        normalizer: str = "",
        pre_tokenizer: str = "",
        show_progress: bool = False,
        **params: Any,
    ) -> None:
        if vocab_size <= 0:
            raise InvalidArgument("must be positive", field="vocab_size")
        self.vocab_size = vocab_size
        self.special_tokens = list(special_tokens or self.default_special_tokens)
        if len(set(self.special_tokens)) != len(self.special_tokens) or any(not t for t in self.special_tokens):
            raise InvalidArgument("must be distinct and non-empty", field="special_tokens")
        self.min_frequency = min_frequency
        self.normalizer_name = normalizer or self.default_normalizer
        self.pre_tokenizer_name = pre_tokenizer or self.default_pre_tokenizer
        if self.normalizer_name not in NORMALIZERS:
            raise InvalidArgument(
                f"unknown normaliser {normalizer!r}; one of {sorted(NORMALIZERS)}", field="normalizer"
            )
        if self.pre_tokenizer_name not in PRE_TOKENIZERS:
            raise InvalidArgument(
                f"unknown pre-tokeniser {pre_tokenizer!r}; one of {sorted(PRE_TOKENIZERS)}", field="pre_tokenizer"
            )
        self.show_progress = show_progress
        self.params = self.check_params(params)

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validate algorithm-specific parameters; the base takes none."""
        if params:
            raise InvalidArgument(f"{self.name} takes no parameters {sorted(params)}", field="params")
        return params

    @property
    def roles(self) -> dict[str, str]:
        return special_token_roles(self.special_tokens)

    def pipeline(self) -> Tokenizer:
        """The untrained tokeniser with its normaliser and pre-tokeniser set."""
        tokenizer = Tokenizer(self.model())
        normalizer = NORMALIZERS[self.normalizer_name]()
        if normalizer is not None:
            tokenizer.normalizer = normalizer
        tokenizer.pre_tokenizer = PRE_TOKENIZERS[self.pre_tokenizer_name]()
        return tokenizer

    def model(self) -> Any:
        raise NotImplementedError

    def trainer(self) -> Any:
        raise NotImplementedError

    def finish(self, tokenizer: Tokenizer) -> None:
        """Set the decoder and post-processor once the vocabulary is known."""

    def min_vocab_size(self, alphabet: set[str]) -> int:
        """The smallest vocabulary that can hold every symbol the corpus needs."""
        return len(self.special_tokens) + (256 if self.byte_level else len(alphabet))


class BPE(Algorithm):
    """Character-level BPE with a metaspace pre-tokeniser (SentencePiece-BPE style; lossless decode)."""

    name = "bpe"
    default_special_tokens = ["<unk>", "<s>", "</s>", "<pad>"]
    default_pre_tokenizer = "metaspace"

    def model(self) -> Any:
        return models.BPE(unk_token=self.roles.get("unk_token"))

    def trainer(self) -> Any:
        return trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=self.special_tokens,
            show_progress=self.show_progress,
        )

    def finish(self, tokenizer: Tokenizer) -> None:
        if self.pre_tokenizer_name == "metaspace":
            tokenizer.decoder = decoders.Metaspace()
        else:
            tokenizer.decoder = decoders.BPEDecoder()


class ByteLevelBPE(Algorithm):
    """GPT-2 style byte-level BPE: every byte is in the vocabulary, so nothing is ever unknown."""

    name = "byte_level_bpe"
    default_special_tokens = ["<|endoftext|>"]
    default_normalizer = "none"
    default_pre_tokenizer = "byte_level"
    byte_level = True

    def trainer(self) -> Any:
        return trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=self.special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=self.show_progress,
        )

    def model(self) -> Any:
        return models.BPE()

    def finish(self, tokenizer: Tokenizer) -> None:
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)


class WordPiece(Algorithm):
    """BERT's WordPiece: `##` marks a continuation; [CLS] and [SEP] frame each sequence."""

    name = "wordpiece"
    default_special_tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    default_normalizer = "bert"
    default_pre_tokenizer = "bert"

    def model(self) -> Any:
        return models.WordPiece(unk_token=self.roles.get("unk_token", "[UNK]"))

    def trainer(self) -> Any:
        return trainers.WordPieceTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=self.special_tokens,
            continuing_subword_prefix="##",
            show_progress=self.show_progress,
        )

    def finish(self, tokenizer: Tokenizer) -> None:
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        cls, sep = self.roles.get("cls_token"), self.roles.get("sep_token")
        if cls and sep:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{cls} $A {sep}",
                pair=f"{cls} $A {sep} $B:1 {sep}:1",
                special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
            )


class Unigram(Algorithm):
    """The Unigram language model of SentencePiece, with its metaspace (▁) word boundaries."""

    name = "unigram"
    default_special_tokens = ["<unk>", "<s>", "</s>", "<pad>"]
    default_normalizer = "nfkc"
    default_pre_tokenizer = "metaspace"

    #: Bounds of each parameter, so a request cannot make training run without end.
    PARAM_RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "max_piece_length": (1, 256),
        "shrinking_factor": (0.01, 0.99),
        "n_sub_iterations": (1, 32),
    }

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(self.PARAM_RANGES)
        if unknown:
            raise InvalidArgument(f"unigram does not take {sorted(unknown)}", field="params")
        for name, value in params.items():
            low, high = self.PARAM_RANGES[name]
            whole = name != "shrinking_factor"
            if (
                isinstance(value, bool)
                or not isinstance(value, int if whole else int | float)
                or not low <= value <= high
            ):
                raise InvalidArgument(
                    f"must be {'a whole number' if whole else 'a number'} in [{low}, {high}]", field=f"params.{name}"
                )
        return params

    def model(self) -> Any:
        return models.Unigram()

    def trainer(self) -> Any:
        return trainers.UnigramTrainer(
            vocab_size=self.vocab_size,
            special_tokens=self.special_tokens,
            unk_token=self.roles.get("unk_token"),
            show_progress=self.show_progress,
            **self.params,
        )

    def finish(self, tokenizer: Tokenizer) -> None:
        tokenizer.decoder = decoders.Metaspace()


ALGORITHMS: Registry[Algorithm] = Registry(
    "tokenizers",
    {
        "bpe": "services.tokenizer.algorithms:BPE",
        "byte_level_bpe": "services.tokenizer.algorithms:ByteLevelBPE",
        "wordpiece": "services.tokenizer.algorithms:WordPiece",
        "unigram": "services.tokenizer.algorithms:Unigram",
    },
    base=Algorithm,
)
