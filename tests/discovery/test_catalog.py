"""The packaged catalog, matching, pricing rules, and credential sealing."""

from __future__ import annotations

import pytest

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.common.crypto import CredentialCipher, CredentialError, credential_hint
from services.discovery.catalog import Catalog, CatalogError, build_model
from services.discovery.records import ProviderRecord, StoredModel

CATALOG = Catalog.packaged()


@pytest.mark.parametrize(
    ("listed", "entry"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("gemini-2.0-flash-001", "gemini-2.0-flash"),
        ("gemini-2.5-pro", "gemini-2.5-pro"),
        ("mistral-small-2503", "mistral-small"),
        ("mistral-small-latest", "mistral-small"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
        ("llama3.1:8b", "llama-3.1-8b-instruct"),
        ("llama3.1:latest", "llama-3.1-8b-instruct"),
        ("smollm2", "smollm2"),
        ("smollm2:135m", "smollm2"),
    ],
)
def test_lookup_matches_exact_alias_and_dated_ids(listed: str, entry: str) -> None:
    found = CATALOG.lookup(listed)
    assert found is not None and found.id == entry


@pytest.mark.parametrize(
    "listed", ["gpt-4o-realtime-preview", "gpt-4o-audio", "gpt-5", "qwen2.5:7b", "gpt-4"]
)
def test_lookup_does_not_guess(listed: str) -> None:
    assert CATALOG.lookup(listed) is None


def provider(**fields: object) -> ProviderRecord:
    values: dict[str, object] = {
        "provider_id": "p",
        "type": pb.PROVIDER_TYPE_OPENAI,
        "base_url": "http://x/v1",
        "health_status": pb.HEALTH_STATUS_HEALTHY,
    }
    values.update(fields)
    return ProviderRecord(**values)  # type: ignore[arg-type]


def test_catalog_price_and_facts() -> None:
    model = build_model(StoredModel("p", "gpt-4o-mini-2024-07-18"), provider(), CATALOG)

    assert model.name == "p/gpt-4o-mini-2024-07-18"
    assert model.price_source == pb.PRICE_SOURCE_CATALOG
    assert model.pricing == pb.Pricing(
        input_micro_usd_per_mtok=150_000,
        output_micro_usd_per_mtok=600_000,
        cached_input_micro_usd_per_mtok=75_000,
    )
    assert (model.context_window, model.max_output_tokens) == (128_000, 16_384)
    assert model.capabilities.tools and model.capabilities.vision
    assert model.quality == pytest.approx(0.62)
    assert model.health.status == pb.HEALTH_STATUS_HEALTHY


def test_local_provider_models_are_free_and_smollm2_has_2048_tokens() -> None:
    local = provider(type=pb.PROVIDER_TYPE_OPENAI_COMPATIBLE, local=True)

    smol = build_model(StoredModel("p", "smollm2", loaded=True), local, CATALOG)
    llama = build_model(StoredModel("p", "llama3.1:8b"), local, CATALOG)

    assert smol.price_source == pb.PRICE_SOURCE_LOCAL
    assert smol.pricing == pb.Pricing()
    assert smol.context_window == 2048
    assert smol.loaded
    assert llama.price_source == pb.PRICE_SOURCE_LOCAL
    assert llama.context_window == 131072


def test_unknown_or_unpriced_models_are_unspecified_never_free() -> None:
    unknown = build_model(StoredModel("p", "some-new-model"), provider(), CATALOG)
    open_weights = build_model(
        StoredModel("p", "meta-llama/Llama-3.1-8B-Instruct", context_window=32768),
        provider(type=pb.PROVIDER_TYPE_VLLM),
        CATALOG,
    )

    assert unknown.price_source == pb.PRICE_SOURCE_UNSPECIFIED
    assert unknown.pricing == pb.Pricing()
    assert unknown.context_window == 0
    assert unknown.capabilities.streaming
    assert open_weights.price_source == pb.PRICE_SOURCE_UNSPECIFIED
    assert open_weights.context_window == 32768  # what the server says beats the catalog


def test_a_broken_catalog_is_refused() -> None:
    with pytest.raises(CatalogError):
        Catalog.parse("version: 1\nmodels:\n  - id: x\n    quality: 7\n")


def test_credentials_are_sealed_per_provider_and_key() -> None:
    cipher = CredentialCipher(b"k" * 32)
    sealed = cipher.seal("openai", "sk-abc")

    assert b"sk-abc" not in sealed
    assert cipher.open("openai", sealed) == "sk-abc"
    assert cipher.seal("openai", "sk-abc") != sealed  # fresh nonce each time
    with pytest.raises(CredentialError):
        cipher.open("other", sealed)  # bound to its provider
    with pytest.raises(CredentialError):
        CredentialCipher(b"j" * 32).open("openai", sealed)
    with pytest.raises(CredentialError):
        cipher.open("openai", b"\x09junk")


@pytest.mark.parametrize(
    ("credential", "hint"),
    [("", ""), ("short", "…"), ("medium-key", "…ey"), ("sk-0123456789abcdefWXYZ", "sk-…WXYZ")],
)
def test_hints_never_reveal_most_of_a_secret(credential: str, hint: str) -> None:
    assert credential_hint(credential) == hint
