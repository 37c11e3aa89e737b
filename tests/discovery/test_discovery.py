"""Discovery passes over RPC: models appear, disappear, survive an outage."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import field_mask_pb2

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.common import errors
from tests.discovery.conftest import SECRET, Handle
from tests.fakes.faults import Fault
from tests.fakes.openai_upstream import FakeOpenAI
from tests.providers.listing_upstreams import FakeOllama

Start = Callable[..., Awaitable[Handle]]
AsCaller = Callable[..., list[tuple[str, str]]]


def config(fake_openai: FakeOpenAI, fake_ollama: FakeOllama) -> str:
    return f"""
providers:
  - id: openai
    type: openai
    base_url: {fake_openai.url}
    credential: {SECRET}
  - id: ollama
    type: ollama
    base_url: {fake_ollama.base_url}
    local: true
"""


async def names(handle: Handle, md: list[tuple[str, str]], provider_id: str = "") -> list[str]:
    response = await handle.stub.ListModels(
        pb.ListModelsRequest(provider_id=provider_id), metadata=md
    )
    return [m.name for m in response.models]


async def test_run_discovery_finds_models_with_prices(
    discovery: Start, fake_openai: FakeOpenAI, fake_ollama: FakeOllama, as_caller: AsCaller
) -> None:
    handle = await discovery(config(fake_openai, fake_ollama))
    admin, reader = as_caller("acme", "operator"), as_caller("router", "internal")

    result = await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)

    assert (result.providers, result.models, dict(result.errors)) == (2, 4, {})
    assert await names(handle, reader) == [
        "ollama/llama3.1:8b",
        "ollama/smollm2:135m",
        "openai/gpt-4o-2024-08-06",
        "openai/gpt-4o-mini",
    ]
    gpt = (
        await handle.stub.GetModel(
            pb.GetModelRequest(name="openai/gpt-4o-2024-08-06"), metadata=reader
        )
    ).model
    assert gpt.provider_type == pb.PROVIDER_TYPE_OPENAI
    assert gpt.model_id == "gpt-4o-2024-08-06"
    assert gpt.price_source == pb.PRICE_SOURCE_CATALOG
    assert gpt.pricing.input_micro_usd_per_mtok == 2_500_000
    assert gpt.context_window == 128_000
    assert gpt.health.status == pb.HEALTH_STATUS_HEALTHY
    assert gpt.last_seen_time.seconds > 0
    smol = (
        await handle.stub.GetModel(pb.GetModelRequest(name="ollama/smollm2:135m"), metadata=reader)
    ).model
    assert (smol.price_source, smol.context_window, smol.loaded) == (
        pb.PRICE_SOURCE_LOCAL,
        2048,
        True,
    )
    assert await names(handle, reader, "ollama") == ["ollama/llama3.1:8b", "ollama/smollm2:135m"]


async def test_a_model_gone_upstream_is_removed(
    discovery: Start, fake_openai: FakeOpenAI, fake_ollama: FakeOllama, as_caller: AsCaller
) -> None:
    handle = await discovery(config(fake_openai, fake_ollama))
    admin = as_caller("acme", "operator")
    await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)

    fake_openai.models.remove("gpt-4o-mini")
    fake_openai.models.append("gpt-4.1")
    result = await handle.stub.RunDiscovery(
        pb.RunDiscoveryRequest(provider_id="openai"), metadata=admin
    )

    assert (result.providers, result.models, result.added, result.removed) == (1, 2, 1, 1)
    assert await names(handle, admin, "openai") == ["openai/gpt-4.1", "openai/gpt-4o-2024-08-06"]
    err = errors.decode(
        await _error(
            handle.stub.GetModel(pb.GetModelRequest(name="openai/gpt-4o-mini"), metadata=admin)
        )
    )
    assert (err.code, err.reason, err.metadata) == (
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
        {"model": "openai/gpt-4o-mini"},
    )


async def test_a_provider_going_down_turns_unhealthy_and_keeps_its_models(
    discovery: Start, fake_openai: FakeOpenAI, fake_ollama: FakeOllama, as_caller: AsCaller
) -> None:
    handle = await discovery(config(fake_openai, fake_ollama))
    admin = as_caller("acme", "operator")
    await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)

    await fake_openai.refuse_connections()
    fake_ollama.tags_status = 500
    result = await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)

    assert set(result.errors) == {"openai", "ollama"}
    assert "cannot reach provider" in result.errors["openai"]
    assert result.errors["ollama"] == "HTTP 500: something went wrong"
    assert len(await names(handle, admin)) == 4
    provider = (
        await handle.stub.GetProvider(pb.GetProviderRequest(provider_id="openai"), metadata=admin)
    ).provider
    assert provider.health.status == pb.HEALTH_STATUS_UNHEALTHY
    assert "cannot reach provider" in provider.health.last_error
    model = (
        await handle.stub.GetModel(pb.GetModelRequest(name="openai/gpt-4o-mini"), metadata=admin)
    ).model
    assert model.health.status == pb.HEALTH_STATUS_UNHEALTHY

    await fake_openai.accept_connections()
    result = await handle.stub.RunDiscovery(
        pb.RunDiscoveryRequest(provider_id="openai"), metadata=admin
    )
    assert dict(result.errors) == {}
    provider = (
        await handle.stub.GetProvider(pb.GetProviderRequest(provider_id="openai"), metadata=admin)
    ).provider
    assert (provider.health.status, provider.health.last_error) == (pb.HEALTH_STATUS_HEALTHY, "")


async def test_disabling_a_provider_hides_its_models(
    discovery: Start, fake_openai: FakeOpenAI, fake_ollama: FakeOllama, as_caller: AsCaller
) -> None:
    handle = await discovery(config(fake_openai, fake_ollama))
    admin = as_caller("acme", "operator")
    await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)
    mask = field_mask_pb2.FieldMask(paths=["enabled"])

    await handle.stub.UpdateProvider(
        pb.UpdateProviderRequest(
            provider=pb.Provider(provider_id="ollama", enabled=False), update_mask=mask
        ),
        metadata=admin,
    )
    assert await names(handle, admin) == ["openai/gpt-4o-2024-08-06", "openai/gpt-4o-mini"]

    await handle.stub.UpdateProvider(
        pb.UpdateProviderRequest(
            provider=pb.Provider(provider_id="ollama", enabled=True), update_mask=mask
        ),
        metadata=admin,
    )
    assert len(await names(handle, admin)) == 4

    await handle.stub.DeleteProvider(pb.DeleteProviderRequest(provider_id="ollama"), metadata=admin)
    assert await names(handle, admin) == ["openai/gpt-4o-2024-08-06", "openai/gpt-4o-mini"]


async def test_create_provider_runs_discovery(
    discovery: Start, fake_ollama: FakeOllama, as_caller: AsCaller
) -> None:
    handle = await discovery()
    admin = as_caller("acme", "operator")
    provider = pb.Provider(
        provider_id="ollama",
        type=pb.PROVIDER_TYPE_OLLAMA,
        base_url=fake_ollama.base_url,
        enabled=True,
    )

    created = await handle.stub.CreateProvider(
        pb.CreateProviderRequest(provider=provider), metadata=admin
    )

    assert created.provider.health.status == pb.HEALTH_STATUS_HEALTHY
    assert await names(handle, admin) == ["ollama/llama3.1:8b", "ollama/smollm2:135m"]
    # Created by RPC, so not local: an Ollama model with no catalog price is unpriced.
    model = (
        await handle.stub.GetModel(pb.GetModelRequest(name="ollama/llama3.1:8b"), metadata=admin)
    ).model
    assert model.price_source == pb.PRICE_SOURCE_UNSPECIFIED


async def test_test_provider_reports_without_storing(
    discovery: Start, fake_openai: FakeOpenAI, fake_ollama: FakeOllama, as_caller: AsCaller
) -> None:
    handle = await discovery(config(fake_openai, fake_ollama))
    admin = as_caller("acme", "operator")

    ok = await handle.stub.TestProvider(
        pb.TestProviderRequest(provider_id="openai"), metadata=admin
    )
    assert (ok.reachable, ok.model_count, ok.error) == (True, 2, "")
    assert ok.health.status == pb.HEALTH_STATUS_HEALTHY
    assert ok.health.last_probe_time.seconds > 0

    fake_openai.set_fault(Fault.http_error(503), endpoint="models")
    bad = await handle.stub.TestProvider(
        pb.TestProviderRequest(provider_id="openai"), metadata=admin
    )
    assert (bad.reachable, bad.model_count) == (False, 0)
    assert bad.error.startswith("HTTP 503")
    assert bad.health.status == pb.HEALTH_STATUS_UNHEALTHY

    missing = errors.decode(
        await _error(
            handle.stub.TestProvider(pb.TestProviderRequest(provider_id="nope"), metadata=admin)
        )
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")
    missing = errors.decode(
        await _error(
            handle.stub.RunDiscovery(pb.RunDiscoveryRequest(provider_id="nope"), metadata=admin)
        )
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")


async def test_list_models_pages_and_checks_input(
    discovery: Start, fake_openai: FakeOpenAI, fake_ollama: FakeOllama, as_caller: AsCaller
) -> None:
    handle = await discovery(config(fake_openai, fake_ollama))
    md = as_caller("acme", "operator")
    await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=md)

    seen: list[str] = []
    token = ""
    while True:
        page = await handle.stub.ListModels(
            pb.ListModelsRequest(page_size=3, page_token=token), metadata=md
        )
        seen += [m.name for m in page.models]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen) and len(seen) == 4

    first = await handle.stub.ListModels(pb.ListModelsRequest(page_size=1), metadata=md)
    other_filter = pb.ListModelsRequest(provider_id="ollama", page_token=first.next_page_token)
    err = errors.decode(await _error(handle.stub.ListModels(other_filter, metadata=md)))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    err = errors.decode(
        await _error(handle.stub.ListModels(pb.ListModelsRequest(page_size=-1), metadata=md))
    )
    assert (err.reason, err.metadata["field"]) == ("INVALID_FIELD", "page_size")
    err = errors.decode(await _error(handle.stub.GetModel(pb.GetModelRequest(), metadata=md)))
    assert (err.reason, err.metadata["field"]) == ("INVALID_FIELD", "name")


async def _error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


async def test_a_custom_provider_reports_the_models_it_declares(
    discovery: Start, as_caller: AsCaller
) -> None:
    # A custom provider has no listing endpoint: its config names its models,
    # and discovery must report exactly those (priced as local here) so routers
    # can route to them. Nothing listens at the URL: no request is made.
    handle = await discovery(
        """
providers:
  - id: acme
    type: custom
    base_url: http://127.0.0.1:9
    local: true
    custom:
      path: /v2/generate
      models: [acme-large, acme-small]
      request: {model: "{{model}}", input: "{{prompt}}"}
      response: {text: output.text}
"""
    )
    admin, reader = as_caller("acme", "operator"), as_caller("router", "internal")

    result = await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)

    assert (result.models, dict(result.errors)) == (2, {})
    assert await names(handle, reader) == ["acme/acme-large", "acme/acme-small"]
    model = (
        await handle.stub.GetModel(pb.GetModelRequest(name="acme/acme-large"), metadata=reader)
    ).model
    assert model.provider_type == pb.PROVIDER_TYPE_CUSTOM
    assert model.price_source == pb.PRICE_SOURCE_LOCAL


async def test_operator_prices_override_the_catalog(
    discovery: Start, fake_openai: FakeOpenAI, fake_ollama: FakeOllama, as_caller: AsCaller
) -> None:
    handle = await discovery(
        config(fake_openai, fake_ollama)
        + """
prices:
  - model: gpt-4o-mini                 # every provider's gpt-4o-mini
    input_usd_per_mtok: 0.10
    output_usd_per_mtok: 0.40
  - model: ollama/llama3.1:8b          # a local model's real cost
    input_usd_per_mtok: 0.02
    output_usd_per_mtok: 0.02
    cached_input_usd_per_mtok: 0.01
"""
    )
    admin, reader = as_caller("acme", "operator"), as_caller("router", "internal")
    await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)

    async def model(name: str) -> pb.Model:
        reply = await handle.stub.GetModel(pb.GetModelRequest(name=name), metadata=reader)
        return reply.model

    mini, llama, gpt4o, smol = (
        await model("openai/gpt-4o-mini"),
        await model("ollama/llama3.1:8b"),
        await model("openai/gpt-4o-2024-08-06"),
        await model("ollama/smollm2:135m"),
    )
    assert (mini.price_source, mini.pricing.input_micro_usd_per_mtok) == (
        pb.PRICE_SOURCE_OVERRIDE,
        100_000,
    )
    assert mini.pricing.output_micro_usd_per_mtok == 400_000
    assert (llama.price_source, llama.pricing.cached_input_micro_usd_per_mtok) == (
        pb.PRICE_SOURCE_OVERRIDE,
        10_000,
    )
    assert gpt4o.price_source == pb.PRICE_SOURCE_CATALOG  # untouched
    assert smol.price_source == pb.PRICE_SOURCE_LOCAL  # untouched
