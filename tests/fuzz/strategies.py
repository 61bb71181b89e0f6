"""Hypothesis strategies for any protobuf message, built from its descriptor.

Nothing here knows a service: every field is drawn from its type, with the values that break
services weighted in — numbers at their extremes, NaN and infinities, empty, huge and invalid
strings, repeated fields of thousands of items, unknown enum numbers, deep and non-finite
`google.protobuf.Struct`s — and, so that calls get past the first check, words the caller names
as meaningful to the service under test (its collection, tokeniser and model names, plugin types).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

F = FieldDescriptor
INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
#: Most items of a "huge" repeated field, and most bytes it may take (well under the servers' limits).
HUGE_REPEATED = 20_000
HUGE_BYTES = 4 << 20
MAX_DEPTH = 4

ADVERSARIAL_TEXT = (
    "",
    " ",
    "\n",
    "name\n",
    "../../../../etc/passwd",
    "/etc/passwd",
    "/dev/zero",
    "a" * 300,
    "\x00",
    "\ud7ff\U0010ffff",
    "🙂" * 50,
    "{{ 'a' * 100000000 }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "(a+)+$",
    "NaN",
    "-1",
    "x" * 100_000,
    "a " * 50_000,
)


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Extremes first, then anything in range, then small values (sizes and counts that run)."""
    edges = sorted({low, high, 0 if low <= 0 else low, 1 if high >= 1 else high, -1 if low < 0 else low})
    small = st.integers(max(low, -3), min(high, 64))
    return st.one_of(st.sampled_from(edges), st.integers(low, high), small)


def floats() -> st.SearchStrategy[float]:
    extreme = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 0.5, 1.0])
    return st.one_of(extreme, st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1))


def texts(words: Sequence[str]) -> st.SearchStrategy[str]:
    options = [st.sampled_from(ADVERSARIAL_TEXT), st.text(max_size=40)]
    if words:
        options.insert(0, st.sampled_from(list(words)))
    return st.one_of(*options)


def json_values(words: Sequence[str], depth: int = 0) -> st.SearchStrategy[Any]:
    """What a Struct can hold, non-finite numbers and deep nesting included."""
    leaves = st.one_of(st.none(), st.booleans(), floats(), integers(-(2**53), 2**53).map(float), texts(words))
    if depth >= MAX_DEPTH:
        return leaves
    inner = json_values(words, depth + 1)
    keys = texts(["type", "size", "overlap", "path", "max_steps", "num_workers", *words])
    return st.one_of(leaves, st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5))


def _struct_value(value: Any, out: struct_pb2.Value) -> None:
    """Like Struct.update, but keeps NaN and infinities (the point of fuzzing them)."""
    if value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, float | int):
        out.number_value = float(value)
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, list):
        out.list_value.SetInParent()
        for item in value:
            _struct_value(item, out.list_value.values.add())
    else:
        out.struct_value.SetInParent()
        for key, item in value.items():
            _struct_value(item, out.struct_value.fields[key])


def structs(words: Sequence[str]) -> st.SearchStrategy[struct_pb2.Struct]:
    def build(fields: dict[str, Any]) -> struct_pb2.Struct:
        out = struct_pb2.Struct()
        for key, value in fields.items():
            _struct_value(value, out.fields[key])
        return out

    keys = texts(["type", "size", "overlap", "max_length", "candidates", *words])
    return st.dictionaries(keys, json_values(words), max_size=6).map(build)


def scalar(field: FieldDescriptor, words: Sequence[str]) -> st.SearchStrategy[Any]:
    t = field.type
    if t in INT_RANGES:
        return integers(*INT_RANGES[t])
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return floats() if t == F.TYPE_DOUBLE else floats().filter(lambda x: not math.isfinite(x) or abs(x) < 3e38)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return texts(words)
    if t == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\xff" * 1000, b"{}", b'{"model": {}}']))
    if t == F.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field type {t}")


def _size(value: Any) -> int:
    if isinstance(value, Message):
        return value.ByteSize()
    return len(value) if isinstance(value, str | bytes) else 8


def repeated(item: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """Mostly a few items; sometimes thousands of copies of one (up to HUGE_BYTES in all)."""

    def copies(pair: tuple[Any, int]) -> list[Any]:
        value, n = pair
        return [value] * max(1, min(n, HUGE_BYTES // max(1, _size(value))))

    huge = st.tuples(item, st.integers(1000, HUGE_REPEATED)).map(copies)
    return st.one_of(st.lists(item, max_size=4), huge)


def messages(descriptor: Descriptor, words: Sequence[str] = (), depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type: each field set or left unset, drawn from its type."""
    cls = _message_class(descriptor)
    if descriptor.full_name == "google.protobuf.Struct":
        return structs(words)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = scalar(field.message_type.fields_by_name["key"], words)
            value_field = field.message_type.fields_by_name["value"]
            value = _field_value(value_field, words, depth + 1)
            fields[field.name] = st.dictionaries(key, value, max_size=4)
        elif field.is_repeated:
            fields[field.name] = repeated(_field_value(field, words, depth + 1))
        else:
            fields[field.name] = _field_value(field, words, depth + 1)
    if depth >= MAX_DEPTH:
        return st.just(cls())
    chosen = st.fixed_dictionaries({}, optional=fields)
    return chosen.map(lambda values: _build(cls, descriptor, values))


def _field_value(field: FieldDescriptor, words: Sequence[str], depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        return st.deferred(lambda: messages(field.message_type, words, depth))
    return scalar(field, words)


def _message_class(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def _build(cls: type[Message], descriptor: Descriptor, values: dict[str, Any]) -> Message:
    out = cls()
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        target = getattr(out, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            if field.message_type is not None:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(out, name, value)
    return out


def mutations(base: Message, words: Sequence[str] = ()) -> st.SearchStrategy[Message]:
    """`base` (a valid request) with up to two of its fields replaced by drawn values, or cleared.

    Random messages are mostly refused at their first bad field; these get past the checks a valid
    request passes and reach the work behind them (training, ingest, generation) with one or two
    values at their extremes."""
    descriptor = base.DESCRIPTOR
    names = [f.name for f in descriptor.fields]
    drawn = messages(descriptor, words)

    def mutate(pair: tuple[list[str], Message]) -> Message:
        chosen, donor = pair
        out = type(base)()
        out.CopyFrom(base)
        for name in chosen:
            out.ClearField(name)
            field = descriptor.fields_by_name[name]
            if field.is_repeated or field.message_type is not None:
                if donor.ListFields() and any(f.name == name for f, _ in donor.ListFields()):
                    getattr(out, name).MergeFrom(getattr(donor, name))
            elif donor.HasField(name) if field.has_presence else True:
                setattr(out, name, getattr(donor, name))
        return out

    return st.tuples(st.lists(st.sampled_from(names), max_size=2, unique=True), drawn).map(mutate)
