"""Model tokenizers, read from the artifact store, for /tokenize, /detokenize and logprob tokens.

The inference service owns models; it says where a served model's folder is (GetModelInfo.path)
and the gateway reads that folder's tokenizer.json (and the chat template beside it) read-only,
resolved inside the store. Loaded tokenizers are kept per (model, path): a model reloaded from
another folder is read again.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from llmp.inference.v1 import inference_pb2 as ipb
from tokenizers import Tokenizer

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from services.gateway import backends
from services.gateway.backends import Backends


@dataclass(frozen=True)
class ModelText:
    tokenizer: Tokenizer
    chat_template: str
    special: dict[str, str]
    context_length: int

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise InvalidArgument("the model has no chat template", field="messages")
        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)


def _read(folder: Any, context_length: int) -> ModelText:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InvalidArgument("the model has no tokenizer.json", field="model")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    template = config.get("chat_template") or ""
    return ModelText(
        Tokenizer.from_file(str(path)), template if isinstance(template, str) else "", special, context_length
    )


class ModelTexts:
    def __init__(self, backends_: Backends, store: ArtifactStore) -> None:
        self.backends, self.store = backends_, store
        self._cache: dict[tuple[str, str], ModelText] = {}

    async def get(self, model: str) -> ModelText:
        """The served model's tokenizer (NOT_FOUND when no such model is loaded)."""
        info = await backends.unary(
            "inference", self.backends.inference.GetModelInfo, ipb.GetModelInfoRequest(model=model)
        )
        key = (model, info.path)
        if key not in self._cache:
            folder = self.store.path(info.path, field="model")
            self._cache[key] = await asyncio.to_thread(_read, folder, info.context_length)
        return self._cache[key]
