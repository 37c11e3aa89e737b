"""ChatService authenticates API keys in the router (no ext_authz hop at the edge).

The real suite: the router asks the real budget service's Authenticate and
listens to the real key invalidation channel on Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.budget.v1 import account_service_pb2_grpc as account_grpc
from orchestra.common.v1 import chat_pb2, errors_pb2, identity_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common import errors
from services.common.key_invalidation import Invalidations
from services.common.stores import connect_redis
from services.router.keyauth import RemoteKeys
from tests.router.conftest import TENANT, Suite

Metadata = list[tuple[str, str]]
AsCaller = Callable[..., Metadata]
SECRET = "ok_app_0123456789abcdefghijklmn"  # the suite's configured key
HOUR = 3600.0


def _request(text: str = "Hi") -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])
        ],
        generation=chat_pb2.GenerationConfig(temperature=0.0, max_tokens=16),
    )


async def _refusal(suite: Suite, metadata: tuple[tuple[str, str], ...]) -> errors.ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in suite.chat.ChatStream(_request(), metadata=metadata):
            pass
    return errors.decode(caught.value)


def _accounts(suite: Suite) -> tuple[account_grpc.AccountServiceAsyncStub, grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(suite.settings.addrs["budget"])
    stub: account_grpc.AccountServiceAsyncStub = account_grpc.AccountServiceStub(channel)
    return stub, channel


async def _new_key(suite: Suite, admin: Metadata, key: account_pb2.ApiKey) -> str:
    accounts, channel = _accounts(suite)
    async with channel:
        created = await accounts.CreateApiKey(
            account_pb2.CreateApiKeyRequest(api_key=key), metadata=admin
        )
    return created.secret


async def test_a_key_in_either_header_opens_a_chat(suite: Suite) -> None:
    headers = ((("authorization", f"Bearer {SECRET}"),), (("x-api-key", SECRET),))
    for n, metadata in enumerate(headers):
        # A prompt of its own each time: the first answer may be cached already.
        events = [e async for e in suite.chat.ChatStream(_request(f"Hi {n}"), metadata=metadata)]
        assert events[-1].WhichOneof("event") == "end"
        assert events[-1].end.cost_micro_usd > 0
    response = await suite.chat.Chat(_request("Hi again"), metadata=(("x-api-key", SECRET),))
    assert response.message.content[0].text == suite.primary.reply_text


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "API_KEY_MISSING"),
        ((("authorization", "Bearer ok_app_wrong-secret-0123456789abcd"),), "API_KEY_INVALID"),
        ((("x-api-key", "not-a-key"),), "API_KEY_INVALID"),
        ((("x-api-key", "x" * 600),), "API_KEY_INVALID"),
        # A forged identity is refused even beside a good key: the identity wins.
        ((("x-orchestra-identity", "v1.forged.0.mac"), ("x-api-key", SECRET)), "IDENTITY_MISSING"),
    ],
)
async def test_refusals(suite: Suite, metadata: tuple[tuple[str, str], ...], reason: str) -> None:
    for _ in range(2):  # the second answer comes from the router's cache
        details = await _refusal(suite, metadata)
        assert (details.code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason)


async def test_a_key_without_the_chat_scope_is_denied(suite: Suite, as_caller: AsCaller) -> None:
    reader = account_pb2.ApiKey(display_name="reader", scopes=[identity_pb2.SCOPE_READ])
    secret = await _new_key(suite, as_caller(TENANT, "admin"), reader)
    details = await _refusal(suite, (("x-api-key", secret),))
    assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


async def test_budget_down_is_unavailable_and_not_cached(suite: Suite) -> None:
    keys: RemoteKeys = suite.running["router"].service.keys  # type: ignore[attr-defined]
    budget = suite.running["budget"]
    # Stop budget's server only: the router's next Authenticate cannot connect.
    await budget.server.stop(0)
    details = await _refusal(suite, (("x-api-key", "ok_app_never-seen-0123456789abcdefg"),))
    assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")
    assert not keys._cache  # nothing was remembered about that key


async def test_revocation_reaches_the_router_at_once(
    suite: Suite, as_caller: AsCaller, redis_url: str
) -> None:
    admin = as_caller(TENANT, "admin")
    chatter = account_pb2.ApiKey(display_name="soon revoked", scopes=[identity_pb2.SCOPE_CHAT])
    secret = await _new_key(suite, admin, chatter)
    router = suite.running["router"].service
    # A cache of its own that keeps answers for an hour: only the invalidation
    # message can make it forget the key.
    keys = RemoteKeys(router.peers, ttl_seconds=HOUR)  # type: ignore[attr-defined]
    client = connect_redis(redis_url)
    listener = Invalidations(client, keys)
    task = asyncio.create_task(listener.listen())
    try:
        principal = await keys.authenticate(secret)
        assert principal.identity.tenant_id == TENANT
        assert list(principal.identity.scopes) == [identity_pb2.SCOPE_CHAT]
        assert principal.policy.cache_enabled  # the tenant's policy comes along
        await asyncio.sleep(0.5)  # the listener's subscription is in place
        await keys.authenticate(secret)  # cached: still good
        accounts, channel = _accounts(suite)
        async with channel:
            await accounts.RevokeApiKey(
                account_pb2.RevokeApiKeyRequest(key_id=principal.identity.key_id), metadata=admin
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                await keys.authenticate(secret)
            except errors.Unauthenticated as exc:
                assert exc.reason == errors_pb2.ERROR_REASON_API_KEY_REVOKED
                break
            assert time.monotonic() < deadline, "the revocation never reached the router"
            await asyncio.sleep(0.05)
    finally:
        listener.stop()
        task.cancel()
        await asyncio.wait([task], timeout=2)
        await client.aclose()


async def test_a_key_stops_at_its_expiry_although_cached(suite: Suite, as_caller: AsCaller) -> None:
    expire = time.time() + HOUR
    key = account_pb2.ApiKey(display_name="expiring", scopes=[identity_pb2.SCOPE_CHAT])
    key.expire_time.FromMicroseconds(int(expire * 1e6))
    secret = await _new_key(suite, as_caller(TENANT, "admin"), key)
    now = [time.time()]
    router = suite.running["router"].service
    peers = router.peers  # type: ignore[attr-defined]
    keys = RemoteKeys(peers, ttl_seconds=HOUR, wall_clock=lambda: now[0])
    principal = await keys.authenticate(secret)
    assert principal.expire_at == pytest.approx(expire, abs=1e-3)
    now[0] = expire + 1  # an hour later, the entry still cached
    with pytest.raises(errors.Unauthenticated) as caught:
        await keys.authenticate(secret)
    assert caught.value.reason == errors_pb2.ERROR_REASON_API_KEY_INVALID
    assert "expired" in caught.value.message
