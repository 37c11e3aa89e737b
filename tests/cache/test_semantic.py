"""The semantic layer on a real Redis: paraphrases hit, anything else in the scope misses,
tenants never meet, and replicas (and restarts) converge on the same view."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from orchestra.cache.v1 import cache_service_pb2
from orchestra.common.v1 import chat_pb2
from services.cache.server import build
from services.common import settings as settings_mod
from services.common.settings import SettingsError
from tests.cache.builders import answer, conversation, key, store_request, text_message
from tests.cache.conftest import StartCache, Stub

Metadata = list[tuple[str, str]]

QUESTION = "How do I reverse a list in Python?"
PARAPHRASE = "How can I reverse a list in Python?"


def semantic_lookup(cache_key: cache_service_pb2.CacheKey) -> cache_service_pb2.LookupRequest:
    """A lookup that may match near questions."""
    return cache_service_pb2.LookupRequest(key=cache_key)


async def eventually_hits(stub: Stub, internal: Metadata, question: str, want: bool) -> None:
    """Polls until the replica's answer for ``question`` is a hit (or a miss), bounded."""
    for _ in range(100):
        response = await stub.Lookup(
            semantic_lookup(key(messages=conversation(question))), metadata=internal
        )
        if response.hit == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the replica never turned {'hit' if want else 'miss'} for {question!r}")


async def test_a_paraphrase_hits_semantically(stub: Stub, internal: Metadata) -> None:
    await stub.Store(
        store_request(key(messages=conversation(QUESTION)), answer("Use reversed().")),
        metadata=internal,
    )

    response = await stub.Lookup(
        semantic_lookup(key(messages=conversation(PARAPHRASE))), metadata=internal
    )

    assert response.hit
    assert response.match_kind == cache_service_pb2.MATCH_KIND_SEMANTIC
    assert 0.9 <= response.similarity < 1.0
    assert response.answer.text == "Use reversed()."


async def test_the_exact_question_still_matches_exactly(stub: Stub, internal: Metadata) -> None:
    await stub.Store(store_request(key(messages=conversation(QUESTION))), metadata=internal)

    response = await stub.Lookup(
        semantic_lookup(key(messages=conversation(QUESTION))), metadata=internal
    )

    assert response.match_kind == cache_service_pb2.MATCH_KIND_EXACT


async def test_an_unrelated_question_misses(stub: Stub, internal: Metadata) -> None:
    await stub.Store(store_request(key(messages=conversation(QUESTION))), metadata=internal)

    response = await stub.Lookup(
        semantic_lookup(key(messages=conversation("What is the boiling point of water?"))),
        metadata=internal,
    )

    assert not response.hit


async def test_exact_only_lookups_skip_the_semantic_layer(stub: Stub, internal: Metadata) -> None:
    await stub.Store(store_request(key(messages=conversation(QUESTION))), metadata=internal)

    response = await stub.Lookup(
        cache_service_pb2.LookupRequest(
            key=key(messages=conversation(PARAPHRASE)), exact_only=True
        ),
        metadata=internal,
    )

    assert not response.hit


@pytest.mark.parametrize(
    "change",
    [
        {"system": "You are a pirate."},
        {"model": "anthropic/claude-3-5-haiku"},
        {"temperature": 0.2},
        {"max_tokens": 10},
        {"earlier_turn": "Answer in French."},
    ],
    ids=lambda change: next(iter(change)),
)
async def test_a_paraphrase_in_another_scope_misses(
    stub: Stub, internal: Metadata, change: dict[str, object]
) -> None:
    await stub.Store(store_request(key(messages=conversation(QUESTION))), metadata=internal)
    system = str(change.pop("system", "You are a terse assistant."))
    earlier = change.pop("earlier_turn", None)
    messages = conversation(PARAPHRASE, system=system)
    if earlier is not None:
        messages[1:1] = [
            text_message(chat_pb2.ROLE_USER, str(earlier)),
            text_message(chat_pb2.ROLE_ASSISTANT, "D'accord."),
        ]

    response = await stub.Lookup(
        semantic_lookup(key(messages=messages, **change)),  # type: ignore[arg-type]
        metadata=internal,
    )

    assert not response.hit


async def test_requests_offering_tools_match_only_exactly(stub: Stub, internal: Metadata) -> None:
    tool = chat_pb2.Tool(function=chat_pb2.FunctionDefinition(name="search", description="web"))
    stored = key(messages=conversation(QUESTION))
    stored.tools.append(tool)
    await stub.Store(store_request(stored), metadata=internal)
    paraphrased = key(messages=conversation(PARAPHRASE))
    paraphrased.tools.append(tool)

    response = await stub.Lookup(semantic_lookup(paraphrased), metadata=internal)

    assert not response.hit


async def test_a_tool_result_turn_never_matches_semantically(
    stub: Stub, internal: Metadata
) -> None:
    def after_tool(result: str) -> list[chat_pb2.Message]:
        call = chat_pb2.ToolCall(id="c1", name="weather", arguments='{"city": "Paris"}')
        return [
            text_message(chat_pb2.ROLE_USER, "Weather in Paris?"),
            chat_pb2.Message(role=chat_pb2.ROLE_ASSISTANT, tool_calls=[call]),
            chat_pb2.Message(
                role=chat_pb2.ROLE_TOOL,
                tool_call_id="c1",
                content=[chat_pb2.ContentPart(text=result)],
            ),
        ]

    await stub.Store(store_request(key(messages=after_tool("Sunny, 21 C"))), metadata=internal)

    response = await stub.Lookup(
        semantic_lookup(key(messages=after_tool("Sunny, 21 C."))), metadata=internal
    )

    assert not response.hit


async def test_no_tenant_ever_gets_another_tenants_entry(stub: Stub, internal: Metadata) -> None:
    # Every tenant stores the same questions; each lookup must come back with
    # its own tenant's answer or nothing, whatever the ids look like.
    tenants = ["acme", "acme-eu", "acm", "ACME", "a:b", "a}", "acme*", "t%41", "tA", ""]
    tenants = [t for t in tenants if t]
    for tenant in tenants:
        for q in (QUESTION, "What is the capital of France?"):
            await stub.Store(
                store_request(
                    key(tenant=tenant, messages=conversation(q)), answer(f"for {tenant}")
                ),
                metadata=internal,
            )
    for tenant in tenants:
        for q in (PARAPHRASE, "Which city is the capital of France?", QUESTION):
            response = await stub.Lookup(
                semantic_lookup(key(tenant=tenant, messages=conversation(q))), metadata=internal
            )
            if response.hit:
                assert response.answer.text == f"for {tenant}"
    response = await stub.Lookup(
        semantic_lookup(key(tenant="initech", messages=conversation(PARAPHRASE))),
        metadata=internal,
    )
    assert not response.hit


async def test_a_new_replica_builds_its_view_from_redis(
    start_cache: StartCache, internal: Metadata
) -> None:
    first = await start_cache()
    await first.Store(store_request(key(messages=conversation(QUESTION))), metadata=internal)

    restarted = await start_cache()  # as after a restart: nothing in memory

    response = await restarted.Lookup(
        semantic_lookup(key(messages=conversation(PARAPHRASE))), metadata=internal
    )
    assert response.hit
    assert response.match_kind == cache_service_pb2.MATCH_KIND_SEMANTIC


async def test_replicas_follow_each_others_stores_and_deletions(
    start_cache: StartCache, internal: Metadata, admin: Metadata
) -> None:
    writer = await start_cache()
    reader = await start_cache()  # started before the store: must learn it from the stream

    await writer.Store(
        store_request(key(messages=conversation(QUESTION)), end_user="u-42"), metadata=internal
    )
    await eventually_hits(reader, internal, PARAPHRASE, True)

    deleted = await writer.Invalidate(
        cache_service_pb2.InvalidateRequest(end_user="u-42"), metadata=admin
    )
    assert deleted.deleted_count == 1
    await eventually_hits(reader, internal, PARAPHRASE, False)


async def test_invalidation_removes_semantic_matches(
    stub: Stub, internal: Metadata, admin: Metadata
) -> None:
    await stub.Store(store_request(key(messages=conversation(QUESTION))), metadata=internal)

    await stub.Invalidate(
        cache_service_pb2.InvalidateRequest(model="openai/gpt-4o-mini"), metadata=admin
    )

    response = await stub.Lookup(
        semantic_lookup(key(messages=conversation(PARAPHRASE))), metadata=internal
    )
    assert not response.hit


async def test_an_expired_entry_is_not_served(stub: Stub, internal: Metadata) -> None:
    await stub.Store(
        store_request(key(messages=conversation(QUESTION)), ttl_seconds=1), metadata=internal
    )
    # Expiry is Redis's clock: wait until Redis itself no longer has it.
    for _ in range(60):
        exact = await stub.Lookup(
            cache_service_pb2.LookupRequest(
                key=key(messages=conversation(QUESTION)), exact_only=True
            ),
            metadata=internal,
        )
        if not exact.hit:
            break
        await asyncio.sleep(0.1)

    response = await stub.Lookup(
        semantic_lookup(key(messages=conversation(PARAPHRASE))), metadata=internal
    )
    assert not response.hit


async def test_semantic_layer_can_be_switched_off(
    start_cache: StartCache, internal: Metadata
) -> None:
    stub = await start_cache(env={"ORCHESTRA_CACHE_SEMANTIC": "false"})
    await stub.Store(store_request(key(messages=conversation(QUESTION))), metadata=internal)

    response = await stub.Lookup(
        semantic_lookup(key(messages=conversation(PARAPHRASE))), metadata=internal
    )
    assert not response.hit


async def test_an_unknown_embedding_model_is_a_settings_error(
    make_settings: Callable[..., settings_mod.Settings], redis_url: str
) -> None:
    with pytest.raises(SettingsError, match=r"ORCHESTRA_CACHE_EMBEDDING_MODEL.*wordllama"):
        await build(
            make_settings(REDIS_URL=redis_url),
            env={"ORCHESTRA_CACHE_EMBEDDING_MODEL": "bert-huge"},
        )


async def test_a_lookup_threshold_above_one_is_refused(stub: Stub, internal: Metadata) -> None:
    request = semantic_lookup(key())
    request.similarity_threshold = 1.5
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Lookup(request, metadata=internal)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
