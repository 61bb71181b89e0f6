"""Redaction of personal data and secrets, replaced with typed placeholders such as ``<EMAIL>``.

Rules are regular expressions, some with a check on the match, applied in a fixed order (the most
specific first, so a private key block is not half-eaten by the base64 rule). Each takes time linear
in the text: a match can start only where a run of its characters starts (a look-behind), and runs
are taken possessively, so no text makes the engine try a run again from every position inside
it. They are heuristics:

- EMAIL: ``local@domain.tld``; ``user@localhost`` (no dot) is kept, an expression such as
  ``a@b.shape`` is taken for an address.
- PHONE: ``+`` country code and digits in groups separated by spaces or dashes (9 to 15 digits in
  all), or North-American ``(555) 123-4567`` / ``555-123-4567``; dates, version numbers and signed
  numbers such as ``+35236450.6`` do not have that shape, nor does an ungrouped ``+14155550132``.
- IP_ADDRESS: IPv4 and IPv6, validated by :mod:`ipaddress`. Loopback, private, link-local and
  unspecified addresses (127.0.0.1, 10.0.0.0/8, ::1, ...) identify no one and are kept unless
  ``redact_non_global_ips``, and so are reserved ones, which keeps slices such as ``a[1::2]``; a
  four-part version string such as 1.2.3.4 is indistinguishable from an address.
- AWS_KEY: access key ids (``AKIA``/``ASIA`` + 16 characters).
- SECRET: tokens with a known prefix (GitHub, Slack, Stripe-style ``sk_``/``sk-``, Google ``AIza``),
  and the value in ``password = "..."`` / ``api_key: ...`` style assignments (a quoted value of
  8+ characters that is not a format string, or an unquoted one of 12+ with letters and digits;
  ``password = getpass()`` is kept).
- PRIVATE_KEY: PEM ``-----BEGIN ... PRIVATE KEY-----`` blocks.
- HEX_TOKEN: 32+ hex digits with both letters and digits (hashes, keys).
- BASE64_TOKEN: 40+ base64 characters with upper case, lower case and digits and near-random
  character entropy (>= 4.2 bits per character), which ordinary identifiers do not reach; not
  after a dot, so URL paths (``python.org/pipermail/...``) are kept. Alphabet strings such as
  ``a...zA...Z0...9`` look random and are redacted.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from services.training.dataprep.stage import Document, DocumentStage, StageStats, require, with_text

# The body stops at the first "-----" (possessively), so each BEGIN scans only up to the next marker.
_PEM = r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:[^-]|-(?!----))*+-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"
_AWS = r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"
_PREFIXED = (
    r"(?<![\w-])(?:gh[pousr]_[A-Za-z0-9]{36,}|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|sk_(?:live|test)_[A-Za-z0-9]{16,}|sk-(?:proj-)?[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35})(?![\w-])"
)
# An assignment to a name mentioning a key, secret, token or password; group 1 is the value. The
# name starts a run of word characters and is taken whole (possessively); the lookahead finds the
# keyword inside that run only, so each run is read a bounded number of times.
_ASSIGNED_NAME = r"(?i)(?<![\w-])(?=[\w-]*?(?:api[_-]?key|secret|token|password|passwd))[\w-]*+[\"']?\s*+[:=]\s*+"
_ASSIGNED_QUOTED = _ASSIGNED_NAME + r"[\"']([^\s\"'<>]{8,})[\"']"
_ASSIGNED_BARE = _ASSIGNED_NAME + r"([A-Za-z0-9_+/=-]{12,})(?![\w.(])"
_EMAIL = r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])"
_IPV6 = r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4})(?![\w:])"
_IPV4 = r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)"
_PHONE = (
    r"(?<![\w+.-])(?:\+\d{1,3}(?:[ -]?\(?\d{1,4}\)?){2,5}"
    r"|(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4})(?![\w-]|\.\d)"
)
_HEX = r"(?<![\w-])[0-9a-fA-F]{32,}(?![\w-])"
_BASE64 = r"(?<![\w+/=.-])[A-Za-z0-9+/_-]{40,}={0,2}(?![\w+/=-])"

_TEMPLATE = re.compile(r"%[-+ #0-9.]*[sdrfx]|\{\w*\}")

KINDS = ("PRIVATE_KEY", "AWS_KEY", "SECRET", "EMAIL", "IP_ADDRESS", "PHONE", "HEX_TOKEN", "BASE64_TOKEN")


@dataclass
class PiiConfig:
    """Which kinds of personal data and secrets to redact."""

    kinds: tuple[str, ...] = KINDS
    """Kinds to redact; each becomes ``<KIND>`` in the text."""
    redact_non_global_ips: bool = False
    """Also redact loopback, private, link-local and unspecified IP addresses."""

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        unknown = sorted(set(self.kinds) - set(KINDS))
        require(not unknown, f"unknown kinds {unknown}; expected some of {list(KINDS)}", "kinds")


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    accept: Callable[[str], bool] | None = None
    """Check on the matched value; a rejected match is left as it is."""


class PiiRedactor:
    """Applies the configured rules to a text and counts replacements per kind."""

    def __init__(self, config: PiiConfig) -> None:
        self.config = config
        rules = (
            _Rule("PRIVATE_KEY", re.compile(_PEM, re.DOTALL)),
            _Rule("AWS_KEY", re.compile(_AWS)),
            _Rule("SECRET", re.compile(_PREFIXED)),
            _Rule("SECRET", re.compile(_ASSIGNED_QUOTED), _is_not_template),
            _Rule("SECRET", re.compile(_ASSIGNED_BARE), _has_letters_and_digits),
            _Rule("EMAIL", re.compile(_EMAIL)),
            _Rule("IP_ADDRESS", re.compile(_IPV6), self._is_redactable_ip),
            _Rule("IP_ADDRESS", re.compile(_IPV4), self._is_redactable_ip),
            _Rule("PHONE", re.compile(_PHONE), _is_phone_number),
            _Rule("HEX_TOKEN", re.compile(_HEX), _has_letters_and_digits),
            _Rule("BASE64_TOKEN", re.compile(_BASE64), _looks_random),
        )
        self._rules = [rule for rule in rules if rule.kind in config.kinds]

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """The text with each match replaced by its placeholder, and the number of matches per kind."""
        found: Counter[str] = Counter()
        for rule in self._rules:
            text = rule.pattern.sub(partial(_replace, rule=rule, found=found), text)
        return text, found

    def _is_redactable_ip(self, text: str) -> bool:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return False
        public = address.is_global and not address.is_reserved
        return public or self.config.redact_non_global_ips


class PiiStage(DocumentStage):
    """Redacts personal data and secrets; counts replacements per kind in the stage's counts."""

    name: ClassVar[str] = "pii"

    def __init__(self, config: PiiConfig) -> None:
        self.redactor = PiiRedactor(config)

    def apply(self, doc: Document, stats: StageStats) -> Document | None:
        text, found = self.redactor.redact(doc["text"])
        stats.counts.update(found)
        return with_text(doc, text)


def _replace(match: re.Match[str], rule: _Rule, found: Counter[str]) -> str:
    """The match with its value (group 1 when the pattern has one, else all of it) replaced."""
    group = 1 if match.re.groups else 0
    if rule.accept is not None and not rule.accept(match.group(group)):
        return match.group(0)
    found[rule.kind] += 1
    whole, offset = match.group(0), match.start()
    return f"{whole[: match.start(group) - offset]}<{rule.kind}>{whole[match.end(group) - offset :]}"


def _has_letters_and_digits(value: str) -> bool:
    return any(ch.isdigit() for ch in value) and any(ch.isalpha() for ch in value)


def _is_phone_number(value: str) -> bool:
    """9 to 15 digits written in groups (a bare ``+10011010010`` is more likely a number)."""
    grouped = any(ch in " -()." for ch in value)
    return grouped and 9 <= sum(ch.isdigit() for ch in value) <= 15


def _is_not_template(value: str) -> bool:
    """Rejects format strings such as ``"%d,%d"`` or ``"{user}:{pass}"``."""
    return _TEMPLATE.search(value) is None


def _looks_random(value: str) -> bool:
    core = value.rstrip("=")
    mixed = all(any(test(c) for c in core) for test in (str.isupper, str.islower, str.isdigit))
    counts = Counter(core).values()
    entropy = -sum(n / len(core) * math.log2(n / len(core)) for n in counts)  # bits per character
    return mixed and entropy >= 4.2
