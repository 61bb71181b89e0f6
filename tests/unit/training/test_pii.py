"""PII and secret redaction: what must be redacted, and look-alikes that must be kept."""

from __future__ import annotations

import pytest

from libs.common.errors import InvalidArgument
from services.training.dataprep import PiiConfig, PiiRedactor, PiiStage, StageStats


@pytest.fixture(scope="module")
def redactor() -> PiiRedactor:
    return PiiRedactor(PiiConfig())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail jane.doe+news@example.co.uk now", "mail <EMAIL> now"),
        ("Contact: bob@mail.example.org.", "Contact: <EMAIL>."),
        ("call +1 415-555-0132 today", "call <PHONE> today"),
        ("call (415) 555-0199", "call <PHONE>"),
        ("office +44 20 7946 0958", "office <PHONE>"),
        ("dns 8.8.8.8 is public", "dns <IP_ADDRESS> is public"),
        ("v6 2001:4860:4860::8888 here", "v6 <IP_ADDRESS> here"),
        ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "aws_access_key_id = <AWS_KEY>"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_access_key = <SECRET>"),
        ('password = "hunter2hunter2"', 'password = "<SECRET>"'),
        ("GITHUB=ghp_abcdefghijklmnopqrstuvwxyz0123456789", "GITHUB=<SECRET>"),
        ("md5 9e107d9d372bb6826bd81d3542a419d6 ok", "md5 <HEX_TOKEN> ok"),
        ("blob ZXhhbXBsZSBiYXNlNjQgZW5jb2RlZCBzZWNyZXQgdmFsdWUgMTIzNDU2Nzg5MA== end", "blob <BASE64_TOKEN> end"),
        (
            "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc+/=\n-----END RSA PRIVATE KEY-----\nafter",
            "key:\n<PRIVATE_KEY>\nafter",
        ),
    ],
)
def test_true_positives_are_replaced_by_typed_placeholders(redactor: PiiRedactor, text: str, expected: str) -> None:
    assert redactor.redact(text)[0] == expected


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.4 was released on 2024-01-15 at 12:30:45.",
        "a[1::2] and std::vector and @property and user@localhost",
        "mac 00:1a:2b:3c:4d:5e, x = 1234567, port 8080, ratio 1.5e-10",
        "local 127.0.0.1, private 10.0.0.5, any 0.0.0.0 and ::1",
        "password = getpass.getpass()",
        "token = self._next_token()",
        'token_range = "%d,%d-%d,%d:"',
        "identifier test_something_with_numbers_123_and_more_words_here",
        "signed +35236450.6 and +10011010010 are numbers",
        "see https://mail.python.org/pipermail/python-dev/2010-January/095637.html",
        "id 12345678901234567890123456789012345 is decimal",
    ],
)
def test_look_alikes_are_kept(redactor: PiiRedactor, text: str) -> None:
    assert redactor.redact(text) == (text, {})


def test_non_global_addresses_can_be_redacted_too() -> None:
    strict = PiiRedactor(PiiConfig(redact_non_global_ips=True))
    assert strict.redact("host 10.0.0.5 and ::1")[0] == "host <IP_ADDRESS> and <IP_ADDRESS>"


def test_only_configured_kinds_are_redacted() -> None:
    emails_only = PiiRedactor(PiiConfig(kinds=("EMAIL",)))
    assert emails_only.redact("a@example.com 8.8.8.8")[0] == "<EMAIL> 8.8.8.8"
    with pytest.raises(InvalidArgument, match="kinds"):
        PiiConfig(kinds=("EMAIL", "SSN"))


def test_stage_counts_redactions_by_kind() -> None:
    stage = PiiStage(PiiConfig())
    stats = StageStats(stage.name)
    docs = [{"id": "1", "text": "a@example.com b@example.com 8.8.8.8"}, {"id": "2", "text": "nothing here"}]
    kept = list(stage.run(docs, stats))
    assert kept[1] is docs[1]
    assert (stats.docs_out, stats.docs_changed, dict(stats.counts)) == (2, 1, {"EMAIL": 2, "IP_ADDRESS": 1})


@pytest.mark.parametrize(
    "unit",
    ["a", "secret", "secret= ", "-----BEGIN RSA PRIVATE KEY-----\n", "-", "a.", "a@b.", "+1 ", "a:", "aB3+", " "],
)
def test_redaction_time_grows_linearly(redactor: PiiRedactor, unit: str) -> None:
    """Eight times the text takes about eight times as long (a quadratic rule would take ~64 times)."""
    import time

    def best(text: str) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            redactor.redact(text)
            times.append(time.perf_counter() - start)
        return min(times)

    small, large = (unit * (n // len(unit)) for n in (40_000, 320_000))
    assert best(large) / best(small) < 32
