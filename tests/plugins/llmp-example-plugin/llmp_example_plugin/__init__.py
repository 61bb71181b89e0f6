"""A character-level tokeniser: every character is a token (a plugin of group llmp.tokenizers)."""

from __future__ import annotations

from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from services.tokenizer.algorithms import Algorithm


class CharLevel(Algorithm):
    name = "char_level"
    default_special_tokens = ["<unk>", "<pad>"]
    default_normalizer = "nfc"
    default_pre_tokenizer = "whitespace"

    def model(self) -> Any:
        return models.WordLevel(unk_token="<unk>")

    def pipeline(self) -> Any:
        tokenizer = super().pipeline()
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        return tokenizer

    def trainer(self) -> Any:
        return trainers.WordLevelTrainer(vocab_size=self.vocab_size, special_tokens=self.special_tokens)

    def finish(self, tokenizer: Any) -> None:
        tokenizer.decoder = decoders.Fuse()
