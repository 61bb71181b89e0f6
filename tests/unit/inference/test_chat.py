"""Chat messages through the model's own template, the model's generation defaults, and sampler
plugins named by requests: through the gRPC adapter's conversion and the in-process core."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llmp.inference.v1 import inference_pb2 as pb
from tokenizers import Tokenizer

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from services.inference.core import InferenceCore
from services.inference.engine import SamplingParams
from services.inference.schema import GenerateInput, ModelSpec
from services.inference.servicer import InferenceServicer, model_info_pb
from tests.helpers.inference_core import greedy, make_core, reference, run
from tests.helpers.tiny_models import TINY, save_tiny_model

CHAT = "models/chat/1"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'tool' %}{{ raise_exception('this model takes no tool messages') }}{% endif %}"
    "<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def byte_ids(store: ArtifactStore, text: str) -> list[int]:
    """The text as the tiny models' tokenizer (one id per byte) encodes it."""
    tokenizer = Tokenizer.from_file(str(store.root / TINY / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    save_tiny_model(store.root)
    folder = save_tiny_model(store.root, CHAT)
    config = {"chat_template": TEMPLATE, "bos_token": "[", "eos_token": {"content": "]", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    generation = json.loads((folder / "generation_config.json").read_text())
    generation.update(temperature=0.7, top_k=5, top_p=1.5)  # top_p out of range: ignored
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return store


@pytest.fixture(scope="module")
def core(store: ArtifactStore) -> InferenceCore:
    core = make_core(store)
    run(core.load_model(ModelSpec("tiny", TINY)))
    run(core.load_model(ModelSpec("chat", CHAT)))
    return core


def chat(*messages: tuple[str, str], max_tokens: int = 8) -> GenerateInput:
    return GenerateInput("", greedy(max_tokens), messages=messages)


def test_messages_are_rendered_with_the_models_template(store: ArtifactStore, core: InferenceCore) -> None:
    chunk = run(core.generate("chat", chat(("system", "be brief"), ("user", "hi"))))
    rendered = "[<system>be brief]<user>hi]<assistant>"
    expected = reference(store, byte_ids(store, rendered), greedy(8))  # same weights as TINY
    assert chunk.prompt_tokens == len(rendered)
    assert chunk.completions[0].token_ids == expected
    info = model_info_pb(run(core.model_info("chat")))
    assert info.has_chat_template and not model_info_pb(run(core.model_info("tiny"))).has_chat_template


@pytest.mark.parametrize(
    ("model", "messages", "field"),
    [
        ("tiny", (("user", "hi"),), "messages"),  # no chat template
        ("chat", (), "messages"),
        ("chat", (("user", "hi"), ("robot", "beep")), "messages[1].role"),
        ("chat", (("tool", "42"),), "messages"),  # the template's own raise_exception
    ],
)
def test_bad_chats_name_the_field(core: InferenceCore, model: str, messages: tuple, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        run(core.generate(model, GenerateInput("", greedy(), messages=messages)))
    assert e.value.field == field
    assert core._served(model).in_flight == 0


def test_unset_fields_take_the_models_generation_defaults(core: InferenceCore) -> None:
    servicer = InferenceServicer(core)
    unset = servicer._input(pb.GenerateRequest(model="chat", text="hi")).params
    assert (unset.temperature, unset.top_k, unset.top_p) == (pytest.approx(0.7), 5, 1.0)
    given = servicer._input(pb.GenerateRequest(model="chat", text="hi", temperature=0, top_k=2)).params
    assert (given.temperature, given.top_k) == (0, 2)
    plain = servicer._input(pb.GenerateRequest(model="tiny", text="hi")).params
    assert (plain.temperature, plain.top_k) == (1.0, 0)


def test_eos_ids_of_generation_config_end_completions(store: ArtifactStore, tmp_path: Path) -> None:
    folder = save_tiny_model(store.root, "models/eos/1")
    prompt = [1, 2, 3]
    free = reference(store, prompt, greedy(6))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[2], 255]}))
    core = make_core(store)
    run(core.load_model(ModelSpec("eos", "models/eos/1")))
    params = SamplingParams(max_tokens=6, temperature=0)
    done = run(core.generate("eos", GenerateInput("", params, token_ids=tuple(prompt))))
    stop = free.index(free[2]) + 1  # the first time the end token comes
    assert done.completions[0].token_ids == free[:stop] and done.completions[0].finish_reason == "stop"


@pytest.fixture
def installed_sampler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """tests/unit/inference/sampler_plugin.py installed as a package declaring an llmp.samplers entry point."""
    dist = tmp_path / "llmp_test_sampler-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmp-test-sampler\nVersion: 0.1\n")
    name = f"ban_tokens_{tmp_path.name[-6:]}".replace("-", "_")  # a fresh name: registries load a plugin once
    (dist / "entry_points.txt").write_text(f"[llmp.samplers]\n{name} = tests.unit.inference.sampler_plugin:BanTokens\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_requests_name_sampler_plugins_allow_listed(
    core: InferenceCore, installed_sampler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer = InferenceServicer(core)
    plain = run(core.generate("tiny", GenerateInput("", greedy(6), token_ids=(1, 2, 3)))).completions[0].token_ids
    spec = {"type": installed_sampler, "ids": [plain[0], plain[1]]}
    request = pb.GenerateRequest(model="tiny", token_ids=pb.TokenIds(ids=[1, 2, 3]), max_tokens=6, temperature=0)
    request.processors.add().update(spec)

    monkeypatch.setenv("LLMP_PLUGINS_ALLOW", "samplers:something_else")
    with pytest.raises(InvalidArgument) as e:
        run(core.generate("tiny", servicer._input(request)))
    assert e.value.field == "processors.type"

    monkeypatch.setenv("LLMP_PLUGINS_ALLOW", f"samplers:{installed_sampler}")
    banned = run(core.generate("tiny", servicer._input(request))).completions[0].token_ids
    assert len(banned) == 6 and plain[0] not in banned and plain[1] not in banned


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"type": "temperature", "temperature": 1e-30}, "processors"),  # built-ins are the request's fields
        ({"type": "no_such_sampler"}, "processors.type"),
        ({"k": 1}, "processors"),
    ],
)
def test_bad_sampler_specs_name_the_field(core: InferenceCore, spec: dict, field: str) -> None:
    request = pb.GenerateRequest(model="tiny", token_ids=pb.TokenIds(ids=[1, 2]), max_tokens=2)
    request.processors.add().update(spec)
    with pytest.raises(InvalidArgument) as e:
        run(core.generate("tiny", InferenceServicer(core)._input(request)))
    assert e.value.field == field
