"""Structured logs: one JSON object per line, with the request id of the call in progress."""

from __future__ import annotations

import json
import logging

import pytest

from libs.common import logs


def test_json_lines_carry_request_id_and_extras(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("tokenizer", "INFO", "json")
    token = logs.request_id.set("req-7")
    try:
        logging.getLogger("llmp.test").info("trained %s", "t:1", extra={"seconds": 1.5})
    finally:
        logs.request_id.reset(token)
    logging.getLogger("llmp.test").debug("not shown at INFO")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["msg"] == "trained t:1" and record["request_id"] == "req-7"
    assert record["service"] == "tokenizer" and record["level"] == "INFO" and record["seconds"] == 1.5


def test_text_format_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("tokenizer", "INFO", "text")
    logging.getLogger("llmp.test").warning("careful")
    assert "WARNING" in capsys.readouterr().err
