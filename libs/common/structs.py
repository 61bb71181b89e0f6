"""google.protobuf.Struct <-> plain Python values, the one conversion every service uses.

A Struct carries every number as a double, so whole numbers come back as ints (3.0 -> 3: sizes
and counts are ints to the code that reads them). NaN and infinities have no JSON form and no
meaning in a config, so they are refused as INVALID_ARGUMENT naming the path of the value
(`config.lr`, `filter.must[0].range.gt`), instead of the error protobuf's JSON printer raises.
Nesting is bounded too: protobuf parses 100 levels, and deep values are a way to make
recursive checks further down slow.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import struct_pb2

from libs.common.errors import InvalidArgument

#: Deepest nesting of lists and objects accepted inside one Struct.
MAX_DEPTH = 32


def plain_value(value: struct_pb2.Value, path: str, depth: int = 0) -> Any:
    """One Value as None, bool, int, float, str, list or dict."""
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"nested deeper than {MAX_DEPTH} levels", field=path)
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidArgument(f"{number} is not a finite number", field=path)
        return int(number) if number.is_integer() else number
    if kind == "struct_value":
        return plain_struct(value.struct_value, path, depth + 1)
    if kind == "list_value":
        return [plain_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value.list_value.values)]
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or a Value with nothing set


def plain_struct(struct: struct_pb2.Struct, path: str, depth: int = 0) -> dict[str, Any]:
    """A Struct as a dict of plain values; `path` names it in errors (e.g. the request field)."""
    return {key: plain_value(v, f"{path}.{key}", depth) for key, v in struct.fields.items()}


def struct_field(message: Any, name: str) -> dict[str, Any] | None:
    """A message's Struct field as a dict, or None when it was not set."""
    if not message.HasField(name):
        return None
    return plain_struct(getattr(message, name), name)


def to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    """A dict of plain values as a Struct."""
    out = struct_pb2.Struct()
    out.update(value)
    return out
