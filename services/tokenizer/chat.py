"""Chat templates: Jinja templates (the Hugging Face convention) rendered in a bounded sandbox.

Jinja's sandbox keeps a template away from Python's internals, but not from the machine's time
and memory: its optimiser folds constants at compile time (`{{ "a" * 10**10 }}` is computed while
compiling), and a render may loop or grow strings without end. So templates here are:

- at most `max_chars` characters long;
- compiled with `*`, `**` and `+` intercepted (never folded at compile time) and checked when
  they run: no result over the output limit, no exponent over MAX_EXPONENT;
- rendered as a stream, stopped when the output passes `max_output_chars` or the render passes
  `seconds`; a render busy without output (a loop of loops) is interrupted by a watchdog that
  raises in its thread at the next bytecode (the loops are Python code, so they see it).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

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
MAX_EXPONENT = 64


@dataclass(frozen=True)
class Limits:
    """What one template may be and do (the tokeniser service's settings)."""

    max_chars: int = 65536
    max_output_chars: int = 16 << 20
    seconds: float = 2.0


class _RenderTimeout(Exception):
    """Raised inside a render's thread by the watchdog."""


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple | bytes) else 0


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, max_output_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.max_output_chars = max_output_chars
        self.globals["raise_exception"] = _raise

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"an exponent over {MAX_EXPONENT}")
        if operator == "*":
            count = right if _sized(left) else left if _sized(right) else None
            if isinstance(count, int) and count * max(_sized(left), _sized(right)) > self.max_output_chars:
                raise SecurityError(f"a product longer than {self.max_output_chars}")
        if operator == "+" and _sized(left) + _sized(right) > self.max_output_chars:
            raise SecurityError(f"a sum longer than {self.max_output_chars}")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        return self._bounded(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        return self._bounded(super().getitem(obj, argument))

    def _bounded(self, value: Any) -> Any:
        """A value grown past the output limit (e.g. a namespace string doubled in a loop) stops the render."""
        if _sized(value) > self.max_output_chars:
            raise SecurityError(f"a value longer than {self.max_output_chars}")
        return value


def _raise(message: str) -> None:
    raise InvalidArgument(message, field="messages")


@lru_cache(maxsize=64)
def compile_template(source: str, limits: Limits = Limits()) -> jinja2.Template:
    if len(source) > limits.max_chars:
        raise InvalidArgument(f"{len(source)} characters; at most {limits.max_chars}", field="chat_template")
    env = _BoundedEnvironment(limits.max_output_chars)
    try:
        return env.from_string(source)
    except (jinja2.TemplateSyntaxError, SecurityError, OverflowError, MemoryError) as e:
        raise InvalidArgument(f"not a valid Jinja template: {e}", field="chat_template") from None


def render(
    source: str,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool,
    roles: dict[str, str],
    limits: Limits = Limits(),
) -> str:
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
    template = compile_template(source, limits)
    try:
        return _render_bounded(template, context, limits)
    except (jinja2.TemplateError, SecurityError, ArithmeticError, TypeError, ValueError, RecursionError) as e:
        raise InvalidArgument(f"chat template failed: {e}", field="chat_template") from None


def _render_bounded(template: jinja2.Template, context: dict[str, Any], limits: Limits) -> str:
    """Render as a stream within the limits; the watchdog stops a render that yields nothing for too long."""
    thread_id = threading.get_ident()
    state = {"done": False}
    guard = threading.Lock()

    def interrupt() -> None:
        with guard:
            if not state["done"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(_RenderTimeout))

    watchdog = threading.Timer(limits.seconds, interrupt)
    watchdog.start()
    end = time.monotonic() + limits.seconds
    parts: list[str] = []
    size = 0
    try:
        try:
            for piece in template.generate(**context):
                size += len(piece)
                if size > limits.max_output_chars:
                    raise SecurityError(f"the output passed {limits.max_output_chars} characters")
                if time.monotonic() > end:
                    raise _RenderTimeout
                parts.append(piece)
        finally:
            with guard:
                state["done"] = True
            watchdog.cancel()
    except _RenderTimeout:
        raise InvalidArgument(f"rendering took longer than {limits.seconds} s", field="chat_template") from None
    return "".join(parts)
