"""Hypothesis strategies built from protobuf descriptors.

:func:`messages` draws a message of any type from its ``Descriptor``: every
field set or left alone, scalars at their bounds or anywhere in their range,
strings empty, unicode (NUL included), or huge, nested messages down to a
depth, repeated and map fields, enums with known and unknown numbers.
:func:`mutated` takes a valid serialization and damages it: bits flipped,
bytes inserted or deleted, a range repeated, the end cut off. Together they
give the wire a gateway sees from a careless or hostile client.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

# A string over the chat size limit (1 MiB) but well under gRPC's 4 MiB message cap,
# so an oversized field meets the service's own check, not the transport's.
HUGE = 1_200_000
MAX_DEPTH = 3
MAX_REPEATED = 3

_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({low, high, 0, 1, -1, 1000, 2**31 - 1, -(2**31), 2**32 - 1})
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high)
    )


def strings() -> st.SearchStrategy[str]:
    """Empty, short ASCII, any unicode (NUL and astral planes), or over 1 MiB."""
    return st.one_of(
        st.just(""),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
        st.text(max_size=40),
        st.sampled_from(["\x00", "a\x00b", "\u202e", "\U0001f600", "%", "../..", "*", "'"]),
        st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\U0001f600"]), st.just(HUGE)),
    )


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        return _integers(*_INT_RANGES[kind])
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if kind == FieldDescriptor.TYPE_STRING:
        return strings()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\xff" * 4096))
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field {field.full_name} of type {kind}")


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


@st.composite
def _message(draw: st.DrawFn, descriptor: Descriptor, depth: int) -> Message:
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        nested = field.type == FieldDescriptor.TYPE_MESSAGE
        if nested and depth >= MAX_DEPTH:
            continue
        if not draw(st.booleans()):
            continue
        target = getattr(message, field.name)
        inner = field.message_type
        if inner is not None and _is_map(field):
            key_field = inner.fields_by_name["key"]
            value_field = inner.fields_by_name["value"]
            for _ in range(draw(st.integers(0, MAX_REPEATED))):
                key = draw(_scalar(key_field))
                if value_field.message_type is not None:
                    target[key].CopyFrom(draw(_message(value_field.message_type, depth + 1)))
                else:
                    target[key] = draw(_scalar(value_field))
        elif _is_repeated(field):
            for _ in range(draw(st.integers(0, MAX_REPEATED))):
                if inner is not None:
                    target.add().CopyFrom(draw(_message(inner, depth + 1)))
                else:
                    target.append(draw(_scalar(field)))
        elif inner is not None:
            target.SetInParent()  # present even when every field inside stays unset
            target.MergeFrom(draw(_message(inner, depth + 1)))
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message


def messages(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with random contents (see the module doc)."""
    return _message(descriptor, 0)


def _apply(data: bytes, op: tuple[str, int, bytes]) -> bytes:
    kind, at, extra = op
    at = at % (len(data) + 1)
    if kind == "flip" and data:
        at %= len(data)
        return data[:at] + bytes([data[at] ^ (extra[0] if extra else 0xFF)]) + data[at + 1 :]
    if kind == "insert":
        return data[:at] + extra + data[at:]
    if kind == "delete":
        return data[:at] + data[at + 1 + len(extra) :]
    if kind == "repeat":
        return data[:at] + data[at : at + 1 + len(extra)] * 2 + data[at + 1 + len(extra) :]
    return data[:at]  # truncate


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` with one to four byte-level mutations applied in turn."""
    op = st.tuples(
        st.sampled_from(["flip", "insert", "delete", "repeat", "truncate"]),
        st.integers(0, 2**16),
        st.binary(min_size=1, max_size=8),
    )
    return st.lists(op, min_size=1, max_size=4).map(lambda ops: _mutate(data, ops))


def _mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    for op in ops:
        data = _apply(data, op)
    return data


def wire(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Request bodies for one input type: valid random messages, or mutated ones."""
    valid = messages(descriptor).map(lambda m: m.SerializeToString())
    return st.one_of(valid, valid.flatmap(mutated))
