"""The router's chat record keeps bodies as the tenant's policy says, end to end."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from orchestra.audit.v1 import audit_service_pb2 as pb
from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.audit.store import RecordFilter
from services.audit.verify import verify
from services.common import errors
from services.common.body_transit import BodyTransit
from services.router.records import audit_payload
from tests.audit.conftest import Audit, Metadata

PROMPT = "what is the capital of France?"
ANSWER = "Paris."
IDENTITY = identity_pb2.Identity(tenant_id="acme", key_id="key-1", team="core")
REQUEST = chat_api.ChatRequest(
    messages=[
        chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=PROMPT)])
    ],
    attribution=chat_pb2.Attribution(end_user="alice"),
)


KEY = b"internal-key" * 3


def _payload(
    mode: int, rid: str = "r1", retention_days: int = 0, key: bytes = KEY
) -> pb.AppendRecordRequest:
    kwargs: dict[str, Any] = {
        "model": "openai/gpt-4o-mini",
        "provider": "openai",
        "reason": "cheapest",
        "cache_hit": False,
        "usage": chat_pb2.Usage(prompt_tokens=7, completion_tokens=2),
        "cost_micro_usd": 12,
        "status_code": 0,
        "error_reason": "",
        "latency_ms": 40,
        "answer_text": ANSWER,
        "fallbacks": [],
        "tool_calls": [chat_pb2.ToolCall(id="t1", name="lookup", arguments="{}")],
        "body_mode": mode,
        "retention_days": retention_days,
        "transit": BodyTransit(key),
    }
    raw = audit_payload(rid, IDENTITY, REQUEST, key, **kwargs)
    return pb.AppendRecordRequest.FromString(raw)


@pytest.mark.parametrize(
    ("mode", "digests", "body"),
    [
        (account_pb2.AUDIT_BODY_MODE_UNSPECIFIED, True, False),
        (account_pb2.AUDIT_BODY_MODE_HASH, True, False),
        (account_pb2.AUDIT_BODY_MODE_ENCRYPTED, False, True),
        (account_pb2.AUDIT_BODY_MODE_NONE, False, False),
    ],
    ids=["default", "hash", "encrypted", "none"],
)
def test_the_policy_decides_what_the_record_carries(mode: int, digests: bool, body: bool) -> None:
    request = _payload(mode)

    chat = request.record.chat
    assert bool(chat.prompt_digest) == digests
    assert bool(chat.response_digest) == digests
    assert request.HasField("body") == body
    # What the outbox holds: neither the prompt nor the answer in clear.
    assert PROMPT.encode() not in request.SerializeToString()
    assert ANSWER.encode() not in request.SerializeToString()
    if body:
        assert not request.body.HasField("chat")
        opened = BodyTransit(KEY).open("chat:r1", request.body.sealed_chat)
        assert opened.messages[0].content[0].text == PROMPT
        assert opened.answer_text == ANSWER
        assert opened.tool_calls[0].name == "lookup"


@pytest.fixture
def suite_key(audit: Audit, make_settings: Any) -> bytes:
    """The internal key the audit service under test runs with."""
    return bytes(make_settings(DATABASE_URL=audit.pg_url).internal_key)


async def test_an_encrypted_chat_reads_back_and_erases(
    audit: Audit, internal: Metadata, as_caller: Any, suite_key: bytes
) -> None:
    admin = as_caller("acme", "admin")
    await audit.stub.AppendRecord(
        _payload(account_pb2.AUDIT_BODY_MODE_ENCRYPTED, retention_days=30, key=suite_key),
        metadata=internal,
    )
    await audit.stub.AppendRecord(
        _payload(account_pb2.AUDIT_BODY_MODE_HASH, "r2"), metadata=internal
    )

    read = await audit.stub.GetRecordBody(
        pb.GetRecordBodyRequest(event_id="chat:r1"), metadata=admin
    )
    assert read.body.messages[0].content[0].text == PROMPT
    assert read.body.answer_text == ANSWER

    erased = await audit.stub.EraseSubject(pb.EraseSubjectRequest(end_user="alice"), metadata=admin)
    assert erased.bodies_unreadable == 1
    assert await verify(audit.service.store) is None


@pytest.mark.parametrize(
    "spoil",
    ["other-record", "other-key", "altered", "both"],
)
async def test_a_sealed_body_that_does_not_open_is_refused(
    audit: Audit, internal: Metadata, suite_key: bytes, spoil: str
) -> None:
    request = _payload(account_pb2.AUDIT_BODY_MODE_ENCRYPTED, key=suite_key)
    if spoil == "other-record":  # a ciphertext moved onto another record
        request.body.sealed_chat = _payload(
            account_pb2.AUDIT_BODY_MODE_ENCRYPTED, "r9", key=suite_key
        ).body.sealed_chat
    elif spoil == "other-key":
        request.body.sealed_chat = _payload(account_pb2.AUDIT_BODY_MODE_ENCRYPTED).body.sealed_chat
    elif spoil == "altered":
        sealed = bytearray(request.body.sealed_chat)
        sealed[-1] ^= 1
        request.body.sealed_chat = bytes(sealed)
    else:
        request.body.chat.answer_text = ANSWER

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.AppendRecord(request, metadata=internal)

    error = errors.decode(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_FIELD"
    assert error.metadata["field"] == "body.sealed_chat"
    listed = await audit.service.store.find(RecordFilter(tenant_id="acme"), None, 10)
    assert listed == []  # nothing appended
