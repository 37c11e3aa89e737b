"""Health and latency probes: rolling statistics, states, every wire format, routers."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from orchestra.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from services.common.catalog_view import ModelCatalogView
from services.discovery.health import HealthPolicy, Outcome, ProbeStats, record, to_health
from services.discovery.probes import measure, provider_entry
from services.discovery.records import ProviderRecord
from services.providers import adapter_for
from tests.discovery.conftest import SECRET, Handle, eventually
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.faults import FakeUpstream, Fault
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.providers.listing_upstreams import FakeOllama as ListingOllama

Start = Callable[..., Awaitable[Handle]]
AsCaller = Callable[..., list[tuple[str, str]]]

HEALTHY = pb.HEALTH_STATUS_HEALTHY
DEGRADED = pb.HEALTH_STATUS_DEGRADED
UNHEALTHY = pb.HEALTH_STATUS_UNHEALTHY
FIRST_TOKEN_DELAY = 0.05  # the fake's fixed latency, seconds


def outcome(ok: bool, ttft: float | None = None, tps: float | None = None) -> Outcome:
    now = datetime.datetime.now(datetime.UTC)
    return Outcome(ok, ttft, tps, "" if ok else "server_error: HTTP 500", "m", now)


def fold(*outcomes: Outcome, policy: HealthPolicy | None = None) -> ProbeStats:
    stats = ProbeStats()
    for o in outcomes:
        stats = record(stats, o, policy or HealthPolicy())
    return stats


# --- rolling statistics (no I/O) ------------------------------------------


def test_states_follow_failures_and_recovery() -> None:
    policy = HealthPolicy(unhealthy_after=3, healthy_after=2)
    states = []
    stats = ProbeStats()
    for ok in (True, False, False, False, True, True, False, True):
        stats = record(stats, outcome(ok, 100.0 if ok else None), policy)
        states.append(stats.status)
    assert states == [
        HEALTHY,
        DEGRADED,
        DEGRADED,
        UNHEALTHY,  # third failure in a row
        UNHEALTHY,  # one pass is not enough to come back
        HEALTHY,
        DEGRADED,
        HEALTHY,
    ]


def test_window_percentiles_ewma_and_error_rate() -> None:
    policy = HealthPolicy(window=10, ewma_alpha=0.5)
    ttfts = [float(t) for t in range(10, 110, 10)]  # 10 … 100
    stats = fold(*(outcome(True, t, 20.0) for t in ttfts), outcome(False), policy=policy)
    health = to_health(stats)
    # The window keeps the 10 newest: 20 … 100 and the failure.
    assert health.probe_count == 10
    assert health.error_rate == pytest.approx(0.1)
    assert health.ttft_p50_ms == 60
    assert health.ttft_p95_ms == 100
    assert health.tokens_per_second == pytest.approx(20.0)
    # EWMA with alpha 0.5 weighs the newest most: well above the mean of 55.
    assert 80 < health.ttft_ewma_ms < 100
    assert health.consecutive_failures == 1
    assert health.last_error == "server_error: HTTP 500"


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        HealthPolicy(unhealthy_after=0)
    with pytest.raises(ValueError):
        HealthPolicy(ewma_alpha=0)


# --- probes through the service ---------------------------------------------


@pytest.fixture
async def slow_openai() -> AsyncIterator[FakeOpenAI]:
    """An OpenAI upstream with a fixed latency to the first token."""
    async with FakeOpenAI(
        api_key=SECRET,
        models=["gpt-4o-mini", "gpt-4o"],
        chunks=4,
        first_token_delay=FIRST_TOKEN_DELAY,
        chunk_delay=0.01,
    ) as fake:
        yield fake


def openai_config(fake: FakeOpenAI) -> str:
    return f"""
providers:
  - id: openai
    type: openai
    base_url: {fake.url}
    credential: {SECRET}
"""


async def model(handle: Handle, name: str, as_caller: AsCaller) -> pb.Model:
    reply = await handle.stub.GetModel(
        pb.GetModelRequest(name=name), metadata=as_caller("acme", "read")
    )
    return reply.model


async def test_probe_times_first_token_and_speed(
    discovery: Start, slow_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    handle = await discovery(openai_config(slow_openai))

    assert await handle.service.prober.run_once(force=True) == 1

    probes = [r for r in slow_openai.requests if r.path.endswith("/chat/completions")]
    assert len(probes) == 1
    body = probes[0].body
    assert body is not None and body["stream"] is True and body["max_tokens"] == 8
    probed = f"openai/{body['model']}"
    health = (await model(handle, probed, as_caller)).health
    assert health.status == HEALTHY
    assert health.probe_count == 1
    # The fake waits FIRST_TOKEN_DELAY before its first event: a lower bound.
    assert health.ttft_p50_ms >= FIRST_TOKEN_DELAY * 1000
    assert health.ttft_p95_ms >= health.ttft_p50_ms
    assert health.ttft_ewma_ms >= FIRST_TOKEN_DELAY * 1000
    assert health.tokens_per_second > 0
    assert health.error_rate == 0
    assert health.probed_model_id == body["model"]
    assert health.HasField("last_probe_time")


async def test_models_are_probed_in_turn(
    discovery: Start, slow_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    handle = await discovery(openai_config(slow_openai))

    for _ in range(2):
        await handle.service.prober.run_once(force=True)

    probed = [
        r.body["model"]
        for r in slow_openai.requests
        if r.path.endswith("/chat/completions") and r.body is not None
    ]
    assert sorted(probed) == ["gpt-4o", "gpt-4o-mini"]
    for name in ("openai/gpt-4o", "openai/gpt-4o-mini"):
        health = (await model(handle, name, as_caller)).health
        assert health.probed_model_id == name.split("/")[1]  # its own figures
        assert health.probe_count == 1
    provider = await handle.stub.GetProvider(
        pb.GetProviderRequest(provider_id="openai"), metadata=as_caller("acme", "read")
    )
    assert provider.provider.health.probe_count == 2


async def test_probe_is_not_repeated_before_its_interval(
    discovery: Start, slow_openai: FakeOpenAI
) -> None:
    handle = await discovery(openai_config(slow_openai))
    # The fixture's probe interval is an hour: the first round claims the
    # provider (it was never probed), the next finds nothing due.
    assert await handle.service.prober.run_once() == 1
    assert await handle.service.prober.run_once() == 0


async def _fail_503(fake: FakeUpstream) -> None:
    fake.set_fault(Fault.http_error(503), endpoint="chat")


async def _heal_503(fake: FakeUpstream) -> None:
    fake.clear_faults()


async def _refuse(fake: FakeUpstream) -> None:
    await fake.refuse_connections()


async def _accept(fake: FakeUpstream) -> None:
    await fake.accept_connections()


@pytest.mark.parametrize(
    ("break_it", "fix_it", "error"),
    [(_fail_503, _heal_503, "server_error: HTTP 503"), (_refuse, _accept, "connect")],
    ids=["http-503", "connection-refused"],
)
async def test_provider_goes_down_and_comes_back(
    discovery: Start,
    slow_openai: FakeOpenAI,
    as_caller: AsCaller,
    break_it: Callable[[FakeUpstream], Awaitable[None]],
    fix_it: Callable[[FakeUpstream], Awaitable[None]],
    error: str,
) -> None:
    slow_openai.models = ["gpt-4o-mini"]
    handle = await discovery(openai_config(slow_openai))
    name = "openai/gpt-4o-mini"
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.running.port}")
    router = ModelCatalogView(
        pb_grpc.DiscoveryServiceStub(channel),
        metadata=as_caller("router", "internal"),
        initial_backoff=0.05,
    )
    router.start()
    try:
        assert await router.wait_ready(10)
        prober = handle.service.prober
        await prober.run_once(force=True)
        await eventually(lambda: _status(router, name) == HEALTHY)

        await break_it(slow_openai)
        seen = []
        for _ in range(3):
            await prober.run_once(force=True)
            seen.append((await model(handle, name, as_caller)).health.status)
        assert seen == [DEGRADED, DEGRADED, UNHEALTHY]
        down = (await model(handle, name, as_caller)).health
        assert error in down.last_error
        assert down.consecutive_failures == 3
        assert down.error_rate == pytest.approx(3 / 4)
        # The router learns it through WatchModels.
        await eventually(lambda: _status(router, name) == UNHEALTHY)

        await fix_it(slow_openai)
        await prober.run_once(force=True)
        assert (await model(handle, name, as_caller)).health.status == UNHEALTHY  # recovering
        await prober.run_once(force=True)
        up = (await model(handle, name, as_caller)).health
        assert up.status == HEALTHY
        assert up.consecutive_failures == 0
        assert up.last_error == ""
        await eventually(lambda: _status(router, name) == HEALTHY)
    finally:
        await router.stop()
        await channel.close()


def _status(router: ModelCatalogView, name: str) -> int:
    found = router.get(name)
    return found.health.status if found is not None else -1


async def test_test_provider_times_a_request(
    discovery: Start, slow_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    handle = await discovery(openai_config(slow_openai))
    reply = await handle.stub.TestProvider(
        pb.TestProviderRequest(provider_id="openai"), metadata=as_caller("acme", "operator")
    )
    assert reply.reachable
    assert reply.model_count == 2
    assert reply.health.status == HEALTHY
    assert reply.health.ttft_p50_ms >= FIRST_TOKEN_DELAY * 1000
    assert reply.error == ""


# --- every wire format through the router's adapters --------------------------


@pytest.mark.parametrize(
    ("kind", "make", "url_suffix"),
    [
        ("anthropic", lambda: FakeAnthropic(api_key=SECRET), ""),
        ("gemini", lambda: FakeGemini(api_key=SECRET), ""),
        ("ollama", lambda: FakeOllama(), "/v1"),  # the native API is found at the root
    ],
)
async def test_each_wire_format_is_probed_as_it_is_used(
    discovery: Start,
    as_caller: AsCaller,
    kind: str,
    make: Callable[[], FakeUpstream],
    url_suffix: str,
) -> None:
    fake = make()
    fake.first_token_delay = FIRST_TOKEN_DELAY
    async with fake:
        config = f"""
providers:
  - id: up
    type: {kind}
    base_url: {fake.base_url}{url_suffix}
    credential: {SECRET}
"""
        handle = await discovery(config)
        assert await handle.service.prober.run_once(force=True) == 1
        models = await handle.stub.ListModels(
            pb.ListModelsRequest(provider_id="up"), metadata=as_caller("acme", "read")
        )
        # One model is probed; the others show their provider's figures until their turn.
        probed = [m for m in models.models if m.health.probed_model_id == m.model_id]
        assert len(probed) == 1, [m.health for m in models.models]
        assert all(m.health.probe_count == 1 for m in models.models)
        health = probed[0].health
        assert health.status == HEALTHY, health.last_error
        assert health.ttft_p50_ms >= FIRST_TOKEN_DELAY * 1000
        chat_paths = {"anthropic": "/v1/messages", "gemini": ":streamGenerateContent"}
        expected = chat_paths.get(kind, "/api/chat")
        assert any(r.path.endswith(expected) for r in fake.requests)


async def test_ollama_reports_loaded_models_memory_and_context(
    discovery: Start, as_caller: AsCaller
) -> None:
    fake = ListingOllama(
        ["llama3.1:8b", "smollm2:135m"], loaded=["smollm2:135m"], contexts={"llama3.1:8b": 131072}
    )
    await fake.start()
    try:
        handle = await discovery(
            f"providers:\n  - id: local\n    type: ollama\n    base_url: {fake.base_url}\n"
            "    local: true\n"
        )
        loaded = await model(handle, "local/smollm2:135m", as_caller)
        idle = await model(handle, "local/llama3.1:8b", as_caller)
    finally:
        await fake.stop()
    assert loaded.loaded
    assert loaded.vram_bytes == ListingOllama.SIZE_VRAM
    assert loaded.memory_bytes == ListingOllama.SIZE
    assert not idle.loaded and idle.vram_bytes == 0 and idle.memory_bytes == 0
    assert idle.context_window == 131072


async def test_a_slow_answer_passes_and_silence_fails() -> None:
    async with FakeOpenAI(models=["m"], chunks=4, chunk_delay=2.0) as slow:
        adapter = adapter_for(provider_entry(ProviderRecord("p", 1, slow.url), ""))
        assert adapter is not None
        try:
            # The first token comes at once, the rest far later than the timeout.
            answered = await measure(adapter, "m", 0.5)
            slow.first_token_delay = 5.0
            silent = await measure(adapter, "m", 0.5)
        finally:
            await adapter.aclose()
    assert answered.ok and answered.ttft_ms is not None and answered.error == ""
    assert not silent.ok and silent.error.startswith("timeout")
