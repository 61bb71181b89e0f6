"""Chat templates: Jinja templates (the Hugging Face convention) rendered in a sandbox."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from libs.common.errors import InvalidArgument

#: ChatML, as used by many open chat models; needs <|im_start|> and <|im_end|> as special tokens.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
ROLES = {"system", "user", "assistant", "tool"}


def _raise(message: str) -> None:
    raise InvalidArgument(message, field="messages")


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidArgument(f"not a valid Jinja template: {e}", field="chat_template") from None


def render(source: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool, roles: dict[str, str]) -> str:
    if not source:
        raise InvalidArgument("this tokenizer has no chat template", field="tokenizer")
    if not messages:
        raise InvalidArgument("at least one message is required", field="messages")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise InvalidArgument(
                f"role {message.get('role')!r} is not one of {sorted(ROLES)}", field=f"messages[{i}].role"
            )
    context: dict[str, Any] = {"messages": list(messages), "add_generation_prompt": add_generation_prompt, **roles}
    try:
        return compile_template(source).render(**context)
    except jinja2.TemplateError as e:
        raise InvalidArgument(f"chat template failed: {e}", field="chat_template") from None
