"""Providers: declared in the config file, managed by RPC, credentials never shown."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.common import errors
from tests.discovery.conftest import SECRET, Handle
from tests.fakes.openai_upstream import FakeOpenAI

Start = Callable[..., Awaitable[Handle]]
AsCaller = Callable[..., list[tuple[str, str]]]


def config_for(fake: FakeOpenAI, *, credential: str = SECRET, extra: str = "") -> str:
    return f"""
providers:
  - id: openai-main
    type: openai
    base_url: {fake.url}
    display_name: OpenAI
    credential: {credential}
    organization: org-test
  - id: local-llm
    type: openai_compatible
    base_url: http://127.0.0.1:9/v1
    local: true
{extra}
"""


async def rpc_error(call: Awaitable[Any]) -> errors.ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return errors.decode(info.value)


def new_provider(fake: FakeOpenAI, provider_id: str = "extra", **fields: Any) -> pb.Provider:
    values: dict[str, Any] = {
        "provider_id": provider_id,
        "type": pb.PROVIDER_TYPE_OPENAI_COMPATIBLE,
        "base_url": fake.url,
        "credential": SECRET,
        "enabled": True,
    }
    values.update(fields)
    return pb.Provider(**values)


async def test_providers_from_the_config_file_appear(
    discovery: Start, fake_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    handle = await discovery(config_for(fake_openai))
    md = as_caller("acme", "read")

    listed = await handle.stub.ListProviders(pb.ListProvidersRequest(), metadata=md)

    assert [p.provider_id for p in listed.providers] == ["local-llm", "openai-main"]
    main = listed.providers[1]
    assert main.type == pb.PROVIDER_TYPE_OPENAI
    assert main.base_url == fake_openai.url
    assert main.display_name == "OpenAI"
    assert main.organization == "org-test"
    assert main.enabled
    assert main.credential == ""
    assert main.credential_hint == f"{SECRET[:3]}…{SECRET[-4:]}"
    assert main.connect_timeout.seconds == 5 and main.read_timeout.seconds == 60
    assert listed.providers[0].credential_hint == ""


async def test_config_is_applied_idempotently_and_pruned(
    discovery: Start, fake_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    first = await discovery(config_for(fake_openai))
    md = as_caller("acme", "operator")
    before = (
        await first.stub.GetProvider(pb.GetProviderRequest(provider_id="openai-main"), metadata=md)
    ).provider
    api_made = new_provider(fake_openai, "api-made")
    await first.stub.CreateProvider(pb.CreateProviderRequest(provider=api_made), metadata=md)
    await first.running.stop(0)

    # Same file again: nothing is rewritten (update_time stays).
    second = await discovery(config_for(fake_openai))
    again = (
        await second.stub.GetProvider(pb.GetProviderRequest(provider_id="openai-main"), metadata=md)
    ).provider
    assert again.update_time == before.update_time
    await second.running.stop(0)

    # A file without local-llm removes it; providers made by RPC stay.
    third = await discovery(config_for(fake_openai).split("  - id: local-llm")[0])
    listed = await third.stub.ListProviders(pb.ListProvidersRequest(), metadata=md)
    assert [p.provider_id for p in listed.providers] == ["api-made", "openai-main"]


async def test_credential_never_appears_in_any_response(
    discovery: Start, fake_openai: FakeOpenAI, as_caller: AsCaller, pg_url: str
) -> None:
    handle = await discovery(config_for(fake_openai))
    md = as_caller("acme", "operator")
    other_secret = "sk-other-" + "Z" * 30
    responses: list[Any] = [
        await handle.stub.GetProvider(
            pb.GetProviderRequest(provider_id="openai-main"), metadata=md
        ),
        await handle.stub.ListProviders(pb.ListProvidersRequest(), metadata=md),
        await handle.stub.CreateProvider(
            pb.CreateProviderRequest(provider=new_provider(fake_openai, credential=other_secret)),
            metadata=md,
        ),
        await handle.stub.UpdateProvider(
            pb.UpdateProviderRequest(
                provider=pb.Provider(provider_id="openai-main", credential=other_secret),
                update_mask=field_mask_pb2.FieldMask(paths=["credential"]),
            ),
            metadata=md,
        ),
        await handle.stub.ListProviders(pb.ListProvidersRequest(), metadata=md),
        await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=md),
        await handle.stub.ListModels(pb.ListModelsRequest(), metadata=md),
        await handle.stub.TestProvider(pb.TestProviderRequest(provider_id="extra"), metadata=md),
    ]
    for response in responses:
        wire = response.SerializeToString()
        for secret in (SECRET, other_secret):
            assert secret.encode() not in wire
            assert secret not in str(response)
    # Nor is it stored in clear.
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT * FROM discovery.providers")
    finally:
        await conn.close()
    dump = repr([dict(r) for r in rows]).encode() + b"".join(
        bytes(r["credential_sealed"] or b"") for r in rows
    )
    for secret in (SECRET, other_secret):
        assert secret.encode() not in dump


async def test_create_get_update_delete(
    discovery: Start, fake_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    handle = await discovery()
    md = as_caller("acme", "operator")
    provider = new_provider(
        fake_openai,
        display_name="Extra",
        headers={"x-team": "search"},
        connect_timeout=duration_pb2.Duration(seconds=2),
    )

    created = (
        await handle.stub.CreateProvider(pb.CreateProviderRequest(provider=provider), metadata=md)
    ).provider
    assert created.provider_id == "extra"
    assert created.headers == {"x-team": "search"}
    assert created.connect_timeout.seconds == 2
    assert created.health.status == pb.HEALTH_STATUS_HEALTHY  # discovery ran on create
    assert created.create_time.seconds > 0

    dup = await rpc_error(
        handle.stub.CreateProvider(pb.CreateProviderRequest(provider=provider), metadata=md)
    )
    assert (dup.code, dup.reason) == (grpc.StatusCode.ALREADY_EXISTS, "RESOURCE_EXISTS")

    updated = (
        await handle.stub.UpdateProvider(
            pb.UpdateProviderRequest(
                provider=pb.Provider(provider_id="extra", display_name="Renamed", enabled=False),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name", "enabled"]),
            ),
            metadata=md,
        )
    ).provider
    assert (updated.display_name, updated.enabled) == ("Renamed", False)
    assert updated.base_url == fake_openai.url  # untouched by the mask

    # Empty mask: every field that is set.
    updated = (
        await handle.stub.UpdateProvider(
            pb.UpdateProviderRequest(
                provider=pb.Provider(provider_id="extra", organization="org-2")
            ),
            metadata=md,
        )
    ).provider
    assert (updated.organization, updated.display_name) == ("org-2", "Renamed")

    await handle.stub.DeleteProvider(pb.DeleteProviderRequest(provider_id="extra"), metadata=md)
    gone = await rpc_error(
        handle.stub.GetProvider(pb.GetProviderRequest(provider_id="extra"), metadata=md)
    )
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")
    assert gone.metadata == {"resource": "provider", "name": "extra"}
    again = await rpc_error(
        handle.stub.DeleteProvider(pb.DeleteProviderRequest(provider_id="extra"), metadata=md)
    )
    assert again.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"provider_id": ""}, "provider.provider_id"),
        ({"provider_id": "Has_Upper"}, "provider.provider_id"),
        ({"type": pb.PROVIDER_TYPE_UNSPECIFIED}, "provider.type"),
        ({"type": 99}, "provider.type"),
        ({"base_url": ""}, "provider.base_url"),
        ({"base_url": "ftp://example.com"}, "provider.base_url"),
        ({"base_url": "https://user:pw@example.com/v1"}, "provider.base_url"),
        ({"base_url": "https://example.com/v1?key=x"}, "provider.base_url"),
        ({"credential": "two\nlines"}, "provider.credential"),
        ({"headers": {"bad header": "x"}}, "provider.headers"),
        ({"headers": {"host": "example.com"}}, "provider.headers"),
        ({"connect_timeout": duration_pb2.Duration(seconds=-1)}, "provider.connect_timeout"),
        ({"read_timeout": duration_pb2.Duration(seconds=3600)}, "provider.read_timeout"),
        ({"display_name": "x" * 201}, "provider.display_name"),
    ],
)
async def test_create_rejects_bad_input(
    discovery: Start,
    fake_openai: FakeOpenAI,
    as_caller: AsCaller,
    fields: dict[str, Any],
    field: str,
) -> None:
    handle = await discovery()
    request = pb.CreateProviderRequest(provider=new_provider(fake_openai, **fields))

    err = await rpc_error(
        handle.stub.CreateProvider(request, metadata=as_caller("acme", "operator"))
    )

    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert err.metadata["field"] == field
    assert field in err.field_violations


async def test_create_without_provider_and_bad_update_masks(
    discovery: Start, fake_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    handle = await discovery(config_for(fake_openai))
    md = as_caller("acme", "operator")
    err = await rpc_error(handle.stub.CreateProvider(pb.CreateProviderRequest(), metadata=md))
    assert (err.reason, err.metadata["field"]) == ("INVALID_FIELD", "provider")

    for path in ("credential_hint", "provider_id", "health", "nonsense"):
        err = await rpc_error(
            handle.stub.UpdateProvider(
                pb.UpdateProviderRequest(
                    provider=pb.Provider(provider_id="openai-main"),
                    update_mask=field_mask_pb2.FieldMask(paths=[path]),
                ),
                metadata=md,
            )
        )
        assert (err.code, err.metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "update_mask",
        )

    err = await rpc_error(
        handle.stub.UpdateProvider(
            pb.UpdateProviderRequest(
                provider=pb.Provider(provider_id="openai-main", base_url="nope"),
                update_mask=field_mask_pb2.FieldMask(paths=["base_url"]),
            ),
            metadata=md,
        )
    )
    assert err.metadata["field"] == "provider.base_url"

    err = await rpc_error(
        handle.stub.UpdateProvider(
            pb.UpdateProviderRequest(provider=pb.Provider(provider_id="missing", display_name="x")),
            metadata=md,
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")


async def test_list_providers_pages(
    discovery: Start, fake_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    handle = await discovery()
    md = as_caller("acme", "operator")
    for name in ("p-c", "p-a", "p-b"):
        provider = new_provider(fake_openai, name, enabled=False)
        await handle.stub.CreateProvider(pb.CreateProviderRequest(provider=provider), metadata=md)

    first = await handle.stub.ListProviders(pb.ListProvidersRequest(page_size=2), metadata=md)
    second = await handle.stub.ListProviders(
        pb.ListProvidersRequest(page_size=2, page_token=first.next_page_token), metadata=md
    )

    assert [p.provider_id for p in first.providers] == ["p-a", "p-b"]
    assert [p.provider_id for p in second.providers] == ["p-c"]
    assert second.next_page_token == ""
    bad = await rpc_error(
        handle.stub.ListProviders(pb.ListProvidersRequest(page_token="garbage"), metadata=md)
    )
    assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


CHANGE_CALLS: list[tuple[str, Any]] = [
    ("CreateProvider", pb.CreateProviderRequest(provider=pb.Provider(provider_id="x"))),
    ("UpdateProvider", pb.UpdateProviderRequest(provider=pb.Provider(provider_id="x"))),
    ("DeleteProvider", pb.DeleteProviderRequest(provider_id="x")),
    ("TestProvider", pb.TestProviderRequest(provider_id="x")),
    ("RunDiscovery", pb.RunDiscoveryRequest()),
]
READ_CALLS: list[tuple[str, Any]] = [
    ("GetProvider", pb.GetProviderRequest(provider_id="x")),
    ("ListProviders", pb.ListProvidersRequest()),
    ("GetModel", pb.GetModelRequest(name="x/y")),
    ("ListModels", pb.ListModelsRequest()),
]


@pytest.mark.parametrize(("method", "request_"), CHANGE_CALLS)
@pytest.mark.parametrize("scopes", [("read",), ("chat",), ("internal",), ("admin",)])
async def test_changes_need_an_operator(
    discovery: Start, as_caller: AsCaller, method: str, request_: Any, scopes: tuple[str, ...]
) -> None:
    handle = await discovery()
    err = await rpc_error(
        getattr(handle.stub, method)(request_, metadata=as_caller("acme", *scopes))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


@pytest.mark.parametrize(("method", "request_"), READ_CALLS)
async def test_reads_need_read_or_internal(
    discovery: Start, as_caller: AsCaller, method: str, request_: Any
) -> None:
    handle = await discovery()
    call = getattr(handle.stub, method)
    denied = await rpc_error(call(request_, metadata=as_caller("acme", "chat")))
    assert (denied.code, denied.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")
    anonymous = await rpc_error(call(request_))
    assert (anonymous.code, anonymous.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "IDENTITY_MISSING",
    )
    for scopes in (("read",), ("internal",), ("admin",)):
        try:
            await call(request_, metadata=as_caller("acme", *scopes))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND  # past the scope check


async def test_a_provider_created_without_enabled_is_enabled(
    discovery: Start, fake_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    handle = await discovery()
    md = as_caller("acme", "operator")
    unset = new_provider(fake_openai, "unset")
    unset.ClearField("enabled")
    off = new_provider(fake_openai, "off", enabled=False)

    made = await handle.stub.CreateProvider(pb.CreateProviderRequest(provider=unset), metadata=md)
    made_off = await handle.stub.CreateProvider(pb.CreateProviderRequest(provider=off), metadata=md)

    assert made.provider.enabled is True
    assert made_off.provider.HasField("enabled") and made_off.provider.enabled is False
    models = await handle.stub.ListModels(pb.ListModelsRequest(), metadata=md)
    assert {m.provider_id for m in models.models} == {"unset"}
    # With an empty mask, an explicit false now counts as set (it has presence).
    await handle.stub.UpdateProvider(
        pb.UpdateProviderRequest(provider=pb.Provider(provider_id="unset", enabled=False)),
        metadata=md,
    )
    got = await handle.stub.GetProvider(pb.GetProviderRequest(provider_id="unset"), metadata=md)
    assert got.provider.enabled is False
