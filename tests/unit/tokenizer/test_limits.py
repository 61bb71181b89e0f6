"""The tokeniser's bounds: imports, chat templates, padding and overflow windows, imported patterns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from services.tokenizer import chat
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import Padding, TokenizerCore, Truncation

FAST = chat.Limits(max_chars=4096, max_output_chars=100_000, seconds=0.5)
MESSAGES = [{"role": "user", "content": "hi"}]


def tokenizer_json(pattern: str) -> bytes:
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return tok.to_str().encode()


@pytest.fixture
def core(tmp_path: Path) -> TokenizerCore:
    config = TokenizerConfig(max_import_bytes=1 << 20, max_output_tokens=10_000, max_overflow_windows=50)
    core = TokenizerCore(config, ArtifactStore(tmp_path / "artifacts"))
    core.import_tokenizer("ab", data=tokenizer_json(r"\s+|[ab]"))
    return core


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'a' * 10**10 }}",  # folded at compile time by Jinja's optimiser, unless intercepted
        "{{ 2 ** 100000000 }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    ],
)
def test_template_bombs_are_refused(template: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        chat.render(template, MESSAGES, False, {}, FAST)
    assert e.value.field == "chat_template"


def test_long_templates_are_refused_and_chatml_still_renders() -> None:
    with pytest.raises(InvalidArgument, match="at most 4096"):
        chat.compile_template("x" * 5000, FAST)
    rendered = chat.render(chat.CHATML, MESSAGES, True, {}, FAST)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a|aa)*b", r"(\w+\s?)*$", r"(a)\1"])
def test_imported_patterns_that_can_hang_are_refused(core: TokenizerCore, pattern: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        core.import_tokenizer("bad", data=tokenizer_json(pattern))
    assert e.value.field == "data.pre_tokenizer.pattern"


def test_gpt_style_patterns_import() -> None:
    gpt4 = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    from services.tokenizer.regex_check import check_tokenizer_json

    check_tokenizer_json(json.loads(tokenizer_json(gpt4)))


def test_import_paths_stay_inside_their_roots(core: TokenizerCore, tmp_path: Path) -> None:
    artifacts = core.artifacts.root
    (artifacts / "imports").mkdir()
    (artifacts / "imports" / "ok.json").write_bytes(tokenizer_json(r"\s+"))
    assert core.import_tokenizer("ok", path="imports/ok.json").ref == "ok:1"
    os.symlink("/etc/passwd", artifacts / "imports" / "out.json")
    os.symlink("/dev/zero", artifacts / "imports" / "zero.json")
    (artifacts / "imports" / "big.json").write_bytes(b" " * ((1 << 20) + 1))
    for path in ("imports/out.json", "imports/zero.json", "imports/big.json", str(artifacts / "imports/ok.json")):
        with pytest.raises(InvalidArgument):
            core.import_tokenizer("bad", path=path)
    with pytest.raises(InvalidArgument, match="at most"):
        core.import_tokenizer("bad", data=b" " * ((1 << 20) + 1))


def test_an_operator_root_allows_absolute_paths(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "tok.json").write_bytes(tokenizer_json(r"\s+"))
    config = TokenizerConfig(import_roots=[str(allowed)])
    core = TokenizerCore(config, ArtifactStore(tmp_path / "artifacts"))
    assert core.import_tokenizer("t", path=str(allowed / "tok.json")).ref == "t:1"
    with pytest.raises(InvalidArgument, match="absolute paths"):
        core.import_tokenizer("t", path=str(tmp_path / "elsewhere.json"))


def test_padding_and_overflow_windows_are_bounded(core: TokenizerCore) -> None:
    with pytest.raises(InvalidArgument) as padded:
        core.encode_batch("ab", ["a b"] * 3, padding=Padding(length=5000))
    assert padded.value.field == "padding.length"
    with pytest.raises(InvalidArgument) as multiple:
        core.encode("ab", "a", padding=Padding(pad_to_multiple_of=2**32 - 1))
    assert multiple.value.field == "padding.length"
    with pytest.raises(InvalidArgument) as windows:
        core.encode("ab", "a b " * 100, truncation=Truncation(max_length=2, stride=1))
    assert windows.value.field == "truncation.max_length"
    within = core.encode("ab", "a b " * 10, truncation=Truncation(max_length=4, stride=1))
    assert len(within.ids) == 4 and within.overflowing


@pytest.mark.parametrize(
    ("params", "field"),
    [({"n_sub_iterations": 10**9}, "params.n_sub_iterations"), ({"max_piece_length": 2.5}, "params.max_piece_length")],
)
def test_unigram_parameters_are_bounded(core: TokenizerCore, params: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        core.train("u", "unigram", 500, texts=["some text to train on"], params=params)
    assert e.value.field == field


def test_overlong_corpus_names_are_invalid_arguments(core: TokenizerCore) -> None:
    with pytest.raises(InvalidArgument) as e:
        next(core.vocab_report(["a" * 300], [], "bpe", [100]))
    assert e.value.field == "corpus[0]"


def test_vocabulary_reports_are_bounded_by_the_bytes_they_train_on(tmp_path: Path) -> None:
    core = TokenizerCore(TokenizerConfig(max_report_bytes=1000), ArtifactStore(tmp_path / "artifacts"))
    with pytest.raises(InvalidArgument) as e:
        next(core.vocab_report([], ["some text to train on\n" * 30], "bpe", [100, 200, 300]))
    assert e.value.field == "vocab_sizes"
    assert next(core.vocab_report([], ["some text to train on\n" * 30], "bpe", [100])).vocab_size == 100


@pytest.mark.parametrize("ref", ["", "/", "//"])
def test_an_empty_corpus_reference_is_not_every_corpus(core: TokenizerCore, ref: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        next(core.vocab_report([ref], [], "bpe", [100]))
    assert e.value.field == "corpus[0]"
