"""`llmp serve ...`: load models on the inference service and generate with them.

    llmp serve load models/tiny/3 --name tiny --quantization int8 --speculative ngram
    llmp serve load models/tiny/3 --name tiny-windowed --sliding-window 16
    llmp serve list / info tiny / unload tiny
    llmp serve generate tiny "def fibonacci(n):" --max-tokens 64 --stream
    llmp serve chat tiny "What is a list?" --system "Answer briefly."
    llmp serve generate tiny "Reply in JSON" --json-schema '{"type": "object"}'

A model path is a folder of the artifact store (relative to its root), as the training service's
registry gives it (`llmp train model tiny:latest`).
"""

from __future__ import annotations

import json
from typing import Any

import click
from google.protobuf import json_format
from llmp.inference.v1 import inference_pb2 as pb
from rich.console import Console
from rich.table import Table

from libs.common.cli.rpc_errors import remote
from libs.common.clients.inference import InferenceClient, generate_request

console = Console()
SERVICE = "the inference service"


@click.group("serve")
def group() -> None:
    """Serving: load and unload models, generate and chat with them."""


@group.command()
@click.argument("path")
@click.option("--name", default="", help="served name (default: from the path)")
@click.option("--quantization", default="", help='int8, int4, nf4 or a JSON spec ({"type": "int4", "group_size": 64})')
@click.option("--speculative", default="", help='ngram or a JSON drafter spec ({"type": "draft_model", "model": ...})')
@click.option("--dtype", default="", help="float32 (default), bfloat16 or float16")
@click.option("--kv-cache-bytes", default=0, help="KV-cache budget of one replica (default 512 MiB)")
@click.option("--compile", "compile_", is_flag=True, help="compile the decode step with torch.compile")
@click.option(
    "--sliding-window", default=0, show_default=True,
    help="attend to the last N tokens only, freeing older KV-cache blocks; 0: off (the model's own window, if any)",
)  # fmt: skip
@click.option(
    "--packed-only", is_flag=True,
    help="bfloat16: keep only the packed weights, not the plain copy that steps of 1-4 sequences read faster",
)  # fmt: skip
@click.option("--replicas", default=1, show_default=True, help="replicas (min and max)")
@click.option("--timeout", default=600.0, show_default=True, help="seconds to wait for the deployment")
def load(
    path: str, name: str, quantization: str, speculative: str, dtype: str, kv_cache_bytes: int, compile_: bool,
    sliding_window: int, packed_only: bool, replicas: int, timeout: float,
) -> None:  # fmt: skip
    """Deploy a model from the artifact store."""
    engine = pb.EngineOptions(
        quantization=quantization, speculative=speculative, dtype=dtype, kv_cache_bytes=kv_cache_bytes,
        compile=compile_, sliding_window=sliding_window or None,  # 0: unset; a negative one is the service's to refuse
        packed_only=packed_only,
    )  # fmt: skip
    scale = pb.ReplicaOptions(min_replicas=replicas, max_replicas=replicas)
    with console.status(f"loading {path}"), remote(SERVICE):
        info = InferenceClient().load(path, name=name, replicas=scale, engine=engine, timeout=timeout)
    window = f", sliding window {info.engine.sliding_window}" if info.engine.HasField("sliding_window") else ""
    console.print(
        f"{info.name}: {info.model_type}, context {info.context_length}, {info.quantization or info.dtype}{window}"
    )


@group.command("list")
def list_models() -> None:
    """The models being served, with their load."""
    with remote(SERVICE):
        models = InferenceClient().models()
    table = Table("name", "path", "context", "quantization", "running", "waiting", "KV cache")
    for m in models:
        load = m.load
        table.add_row(
            m.name, m.path, str(m.context_length), m.quantization or m.dtype, str(load.running),
            str(load.waiting), f"{load.kv_cache_usage:.0%}",
        )  # fmt: skip
    console.print(table)


@group.command()
@click.argument("name")
def info(name: str) -> None:
    """A served model's settings and load, as JSON."""
    with remote(SERVICE):
        model = InferenceClient().model(name)
    console.print_json(json_format.MessageToJson(model))


@group.command()
@click.argument("name")
def unload(name: str) -> None:
    """Stop serving a model."""
    with remote(SERVICE):
        InferenceClient().unload(name)
    console.print(f"{name}: unloaded")


def sampling(
    max_tokens: int, temperature: float, top_p: float, seed: int | None, json_schema: str | None
) -> dict[str, Any]:
    values: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    if json_schema:
        try:
            values["processors"] = [{"type": "structured", "json_schema": json.loads(json_schema)}]
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"not JSON: {e.msg}", param_hint="--json-schema") from None
    return values


def run(model: str, stream: bool, prompt: dict[str, Any], values: dict[str, Any]) -> None:
    """Print the completion (token by token with --stream), then its usage."""
    processors = values.pop("processors", [])
    request = generate_request(model, **prompt, **values)
    for p in processors:  # sampler stages (structured output) travel as Structs
        request.processors.add().update(p)
    stub = InferenceClient().stub
    usage, finish = pb.Usage(), ""
    with remote(SERVICE):
        for reply in stub.GenerateStream(request) if stream else [stub.Generate(request)]:
            for c in reply.completions:
                click.echo(c.text, nl=False)
                finish = c.finish_reason or finish
            if reply.HasField("usage"):
                usage = reply.usage
    click.echo()
    console.print(f"({usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens; {finish})")


SAMPLING = [
    click.option("--max-tokens", default=64, show_default=True),
    click.option("--temperature", default=0.0, show_default=True, help="0 is greedy"),
    click.option("--top-p", default=1.0, show_default=True),
    click.option("--seed", type=int, default=None),
    click.option("--json-schema", help="constrain the output to JSON valid against this schema"),
    click.option("--stream", is_flag=True, help="print tokens as they come"),
]


def with_sampling(command: Any) -> Any:
    for option in reversed(SAMPLING):
        command = option(command)
    return command


@group.command()
@click.argument("model")
@click.argument("prompt")
@with_sampling
def generate(
    model: str, prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int | None,
    json_schema: str | None, stream: bool,
) -> None:  # fmt: skip
    """Complete a text prompt."""
    run(model, stream, {"text": prompt}, sampling(max_tokens, temperature, top_p, seed, json_schema))


@group.command()
@click.argument("model")
@click.argument("message")
@click.option("--system", default="", help="a system message before it")
@with_sampling
def chat(
    model: str, message: str, system: str, max_tokens: int, temperature: float, top_p: float, seed: int | None,
    json_schema: str | None, stream: bool,
) -> None:  # fmt: skip
    """One chat turn, rendered with the model's own chat template."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": message})
    run(model, stream, {"messages": messages}, sampling(max_tokens, temperature, top_p, seed, json_schema))
