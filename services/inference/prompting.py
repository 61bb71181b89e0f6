"""What a model folder says about prompting it: its chat template and its generation defaults.

Chat: the template kept with the model's tokenizer (`chat_template.jinja`, else the
`chat_template` of `tokenizer_config.json`, a string or a list of named templates of which
"default" is used) renders a list of messages, with the generation prompt added, through
`transformers`' renderer, which runs Jinja in its immutable sandbox (no attribute of Python's
internals, no mutation of the data passed in). The template comes from the artifact store, the
messages from the caller: both are capped (template size, message count, rendered length).

Defaults: `generation_config.json` gives the sampling values a request takes for fields it leaves
unset (temperature, top_k, top_p, repetition_penalty; `do_sample: false` means greedy). A value
outside the engine's ranges is ignored, so a model's file never makes a request fail. (Its
end-of-sequence ids `transformers` loads with the model, and the engine stops at them.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.common.errors import InvalidArgument
from services.inference.engine import SamplingParams

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
ROLES = ("system", "user", "assistant", "tool")
MAX_TEMPLATE_CHARS = 256 << 10
MAX_MESSAGES = 1024
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
DEFAULT_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")


def _read_json(path: Path, root: Path) -> dict[str, Any]:
    """A JSON object file inside `root`; {} when absent or not an object."""
    if not path.is_file():
        return {}
    if not path.resolve().is_relative_to(root.resolve()):
        raise InvalidArgument(f"{path.name} leads outside the artifact store", field="path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{path.name} cannot be read: {e}", field="path") from None
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template and the special tokens it may refer to."""

    source: str
    special_tokens: dict[str, str]

    @classmethod
    def read(cls, model_dir: Path, root: Path) -> ChatTemplate | None:
        """The folder's template, or None when it has none."""
        config = _read_json(model_dir / TOKENIZER_CONFIG, root)
        source = _template_source(model_dir, root, config.get("chat_template"))
        if source is None:
            return None
        if len(source) > MAX_TEMPLATE_CHARS:
            raise InvalidArgument(f"the chat template is over {MAX_TEMPLATE_CHARS} characters", field="path")
        special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKENS}
        return cls(source, {k: v for k, v in special.items() if v is not None})

    def render(self, messages: Sequence[tuple[str, str]], max_chars: int) -> str:
        """The prompt text of `messages` (role, content), ending with the generation prompt."""
        from transformers.utils.chat_template_utils import render_jinja_template

        check_messages(messages)
        conversation = [{"role": role, "content": content} for role, content in messages]
        render: Any = render_jinja_template  # its **kwargs are the template's variables (the special tokens)
        try:
            rendered, _ = render(
                conversations=[conversation],
                chat_template=self.source,
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except Exception as e:  # a template's raise_exception, a sandbox refusal, a syntax error
            raise InvalidArgument(f"the model's chat template refused them: {e}", field="messages") from None
        text = rendered[0]
        if len(text) > max_chars:
            raise InvalidArgument(f"render to over {max_chars} characters", field="messages")
        return text


def _template_source(model_dir: Path, root: Path, configured: Any) -> str | None:
    path = model_dir / TEMPLATE_FILE
    if path.is_file():
        if not path.resolve().is_relative_to(root.resolve()):
            raise InvalidArgument(f"{TEMPLATE_FILE} leads outside the artifact store", field="path")
        return path.read_text(encoding="utf-8")
    if isinstance(configured, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in configured if isinstance(t, dict)}
        configured = named.get("default")
    return configured if isinstance(configured, str) and configured.strip() else None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def check_messages(messages: Sequence[tuple[str, str]]) -> None:
    """At least one message, at most MAX_MESSAGES, each of a known role."""
    if not messages:
        raise InvalidArgument("must hold at least one message", field="messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"at most {MAX_MESSAGES} messages", field="messages")
    for i, (role, _) in enumerate(messages):
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)} (got {role!r})", field=f"messages[{i}].role")


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling defaults of generation_config.json."""

    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
    """SamplingParams field -> default, only those inside the engine's ranges."""

    @classmethod
    def read(cls, model_dir: Path, root: Path, vocab_size: int) -> GenerationDefaults:
        config = _read_json(model_dir / GENERATION_CONFIG, root)
        sampling = {name: config[name] for name in DEFAULT_FIELDS if isinstance(config.get(name), int | float)}
        if config.get("do_sample") is False:
            sampling = {"temperature": 0.0}
        valid = {}
        for name, value in sampling.items():
            try:
                SamplingParams(**{name: value}).validate(vocab_size)
            except (InvalidArgument, TypeError):
                continue
            valid[name] = value
        return cls(valid)

    def params(self) -> SamplingParams:
        """SamplingParams whose values are the model's defaults (the engine's where it has none)."""
        return SamplingParams(**self.sampling)
