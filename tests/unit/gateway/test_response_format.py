"""response_format becomes the inference service's structured-output stage, or a 400 naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.openai_schema import ChatRequest

MESSAGES = [{"role": "user", "content": "yes or no?"}]
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}


def test_json_schema_becomes_the_structured_stage() -> None:
    body = ChatRequest(
        model="m",
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
    )
    assert body.structured() == {"type": "structured", "json_schema": SCHEMA}


def test_json_object_and_text() -> None:
    as_object = ChatRequest(model="m", messages=MESSAGES, response_format={"type": "json_object"})
    assert as_object.structured() == {"type": "structured", "json_object": True}
    assert ChatRequest(model="m", messages=MESSAGES, response_format={"type": "text"}).structured() is None
    assert ChatRequest(model="m", messages=MESSAGES).structured() is None


@pytest.mark.parametrize("json_schema", [None, {"name": "a"}, {"name": "a", "schema": "not an object"}])
def test_a_json_schema_without_its_schema_is_refused(json_schema: object) -> None:
    with pytest.raises(ValidationError, match=r"response_format\.json_schema\.schema"):
        ChatRequest(model="m", messages=MESSAGES, response_format={"type": "json_schema", "json_schema": json_schema})
