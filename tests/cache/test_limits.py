"""Size limits: a tenant's oldest entries are evicted, atomically with the store
that goes over, by entry count and by answer bytes; other tenants are untouched."""

from __future__ import annotations

from orchestra.cache.v1 import cache_service_pb2
from tests.cache.builders import answer, conversation, key, store_request
from tests.cache.conftest import StartCache

Metadata = list[tuple[str, str]]
QUESTIONS = [f"What is the population of city number {n}?" for n in range(5)]


async def _hits(stub: object, internal: Metadata, tenant: str, questions: list[str]) -> list[bool]:
    out = []
    for q in questions:
        response = await stub.Lookup(  # type: ignore[attr-defined]
            cache_service_pb2.LookupRequest(
                key=key(tenant=tenant, messages=conversation(q)), exact_only=True
            ),
            metadata=internal,
        )
        out.append(response.hit)
    return out


async def test_the_oldest_entries_go_beyond_the_entry_limit(
    start_cache: StartCache, internal: Metadata
) -> None:
    stub = await start_cache(env={"ORCHESTRA_CACHE_MAX_ENTRIES_PER_TENANT": "3"})
    await stub.Store(
        store_request(key(tenant="other", messages=conversation(QUESTIONS[0]))),
        metadata=internal,
    )
    for n, q in enumerate(QUESTIONS):
        await stub.Store(
            store_request(key(messages=conversation(q)), request_id=f"r{n}"), metadata=internal
        )

    assert await _hits(stub, internal, "acme", QUESTIONS) == [False, False, True, True, True]
    assert await _hits(stub, internal, "other", QUESTIONS[:1]) == [True]


async def test_the_oldest_entries_go_beyond_the_byte_limit(
    start_cache: StartCache, internal: Metadata
) -> None:
    body = "x" * 1000
    size = len(answer(body).SerializeToString(deterministic=True))
    stub = await start_cache(
        env={"ORCHESTRA_CACHE_MAX_BYTES_PER_TENANT": str(2 * size + size // 2)}
    )
    for n, q in enumerate(QUESTIONS[:4]):
        await stub.Store(
            store_request(key(messages=conversation(q)), answer(body), request_id=f"r{n}"),
            metadata=internal,
        )

    assert await _hits(stub, internal, "acme", QUESTIONS[:4]) == [False, False, True, True]


async def test_storing_the_same_entry_again_does_not_count_twice(
    start_cache: StartCache, internal: Metadata
) -> None:
    stub = await start_cache(env={"ORCHESTRA_CACHE_MAX_ENTRIES_PER_TENANT": "2"})
    for n in range(5):  # the same key five times: still one entry
        await stub.Store(
            store_request(key(messages=conversation(QUESTIONS[0])), request_id=f"r{n}"),
            metadata=internal,
        )
    await stub.Store(store_request(key(messages=conversation(QUESTIONS[1]))), metadata=internal)

    assert await _hits(stub, internal, "acme", QUESTIONS[:2]) == [True, True]


async def test_an_evicted_entry_leaves_the_semantic_view(
    start_cache: StartCache, internal: Metadata
) -> None:
    stub = await start_cache(env={"ORCHESTRA_CACHE_MAX_ENTRIES_PER_TENANT": "1"})
    await stub.Store(
        store_request(key(messages=conversation("How do I reverse a list in Python?"))),
        metadata=internal,
    )
    await stub.Store(
        store_request(key(messages=conversation("What is the boiling point of water?"))),
        metadata=internal,
    )

    response = await stub.Lookup(
        cache_service_pb2.LookupRequest(
            key=key(messages=conversation("How can I reverse a list in Python?"))
        ),
        metadata=internal,
    )
    assert not response.hit
