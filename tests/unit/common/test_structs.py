"""Struct -> plain values: whole numbers as ints, NaN/Inf and deep nesting refused naming the path."""

from __future__ import annotations

import math

import pytest
from google.protobuf import struct_pb2

from libs.common.errors import InvalidArgument
from libs.common.structs import MAX_DEPTH, plain_struct, struct_field, to_struct


def test_round_trip_gives_ints_for_whole_numbers() -> None:
    value = {"steps": 3, "lr": 0.5, "name": "x", "on": True, "none": None, "list": [1, 2.5, {"k": 4}]}
    assert plain_struct(to_struct(value), "config") == value
    assert type(plain_struct(to_struct({"n": 3.0}), "c")["n"]) is int


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_invalid_arguments_naming_the_path(bad: float) -> None:
    struct = struct_pb2.Struct()
    struct.update({"filter": {"must": [{"range": {"gt": 0}}]}})
    struct["filter"]["must"][0]["range"]["gt"] = bad
    with pytest.raises(InvalidArgument) as e:
        plain_struct(struct, "search")
    assert e.value.field == "search.filter.must[0].range.gt"


def test_deep_nesting_is_refused() -> None:
    nested: dict = {}
    inner = nested
    for _ in range(MAX_DEPTH + 2):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(InvalidArgument, match="nested deeper"):
        plain_struct(to_struct(nested), "config")


def test_unset_field_is_none() -> None:
    from llmp.training.v1 import training_pb2 as pb

    assert struct_field(pb.SubmitJobRequest(), "config") is None
    assert struct_field(pb.SubmitJobRequest(config=to_struct({"a": 1})), "config") == {"a": 1}
