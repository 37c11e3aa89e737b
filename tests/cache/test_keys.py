"""The canonical exact key, as a pure function (no server needed)."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from orchestra.cache.v1 import cache_service_pb2
from orchestra.common.v1 import chat_pb2
from services.cache.keys import normalise, normalise_text
from tests.cache.builders import conversation, key, text_message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello  world", "Hello world"),
        ("Hello\tworld  ", "Hello world"),
        ("  Hello world\n\n", "Hello world"),
        ("one\r\ntwo\rthree", "one\ntwo\nthree"),
        ("one\n\n\n\ntwo", "one\n\ntwo"),
        ("one   \n   \ntwo", "one\n\ntwo"),
        ("def f():\n    return  1", "def f():\n    return 1"),
        ("Cafe\u0301", "Caf\u00e9"),  # decomposed e + accent -> NFC
        ("a\u00a0\u2003b", "a b"),
    ],
)
def test_text_normalisation(raw: str, expected: str) -> None:
    assert normalise_text(raw) == expected


def test_digest_ignores_construction_order_and_empty_defaults() -> None:
    built = key(temperature=0.0, stop=["b", "a"])
    other = cache_service_pb2.CacheKey()
    other.generation.stop.extend(["a", "b", "a"])
    other.generation.temperature = 0.0
    other.generation.response_format.type = chat_pb2.RESPONSE_FORMAT_TYPE_TEXT
    other.messages.extend(conversation())
    other.model = built.model
    other.tenant_id = built.tenant_id
    assert normalise(built).digest == normalise(other).digest
    assert len(normalise(built).digest) == 64


def test_unset_generation_equals_empty_generation() -> None:
    bare = cache_service_pb2.CacheKey(tenant_id="acme", model="m", messages=conversation())
    empty = cache_service_pb2.CacheKey(
        tenant_id="acme", model="m", messages=conversation(), generation=chat_pb2.GenerationConfig()
    )
    assert normalise(bare).digest == normalise(empty).digest


def test_unset_temperature_differs_from_every_value() -> None:
    unset = cache_service_pb2.CacheKey(tenant_id="acme", model="m", messages=conversation())
    digests = {normalise(key(tenant="acme", model="m", temperature=t)).digest for t in (0, 1)}
    assert normalise(unset).digest not in digests


def test_tenant_is_part_of_the_document() -> None:
    document = normalise(key(tenant="acme")).canonical
    assert document["tenant"] == "acme"
    assert normalise(key(tenant="acme")).digest != normalise(key(tenant="acme-eu")).digest


def _agent_turns(call_id: str, arguments: str) -> list[chat_pb2.Message]:
    return [
        text_message(chat_pb2.ROLE_USER, "Weather in Paris?"),
        chat_pb2.Message(
            role=chat_pb2.ROLE_ASSISTANT,
            tool_calls=[chat_pb2.ToolCall(id=call_id, name="weather", arguments=arguments)],
        ),
        chat_pb2.Message(
            role=chat_pb2.ROLE_TOOL,
            tool_call_id=call_id,
            content=[chat_pb2.ContentPart(text="18C, sunny")],
        ),
    ]


def test_tool_call_ids_and_argument_formatting_do_not_matter() -> None:
    first = key(messages=_agent_turns("call_abc", '{"city": "Paris", "unit": "C"}'))
    second = key(messages=_agent_turns("call_xyz", '{"unit":"C","city":"Paris"}'))
    assert normalise(first).digest == normalise(second).digest


def test_tool_call_arguments_values_matter() -> None:
    first = key(messages=_agent_turns("call_abc", '{"city": "Paris"}'))
    second = key(messages=_agent_turns("call_abc", '{"city": "Lyon"}'))
    assert normalise(first).digest != normalise(second).digest


def test_tools_are_part_of_the_key() -> None:
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"city": {"type": "string"}}})
    with_tool = key()
    with_tool.tools.add().function.CopyFrom(
        chat_pb2.FunctionDefinition(name="weather", description="Weather", parameters=params)
    )
    assert normalise(with_tool).digest != normalise(key()).digest
