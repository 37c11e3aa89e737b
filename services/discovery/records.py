"""The rows discovery keeps in PostgreSQL, as plain values."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

from orchestra.discovery.v1 import discovery_service_pb2 as pb

SOURCE_API = "api"
SOURCE_CONFIG = "config"

DEFAULT_CONNECT_TIMEOUT_MS = 5_000
DEFAULT_READ_TIMEOUT_MS = 60_000


@dataclasses.dataclass(frozen=True)
class ProviderRecord:
    """A provider row (``discovery.providers``).

    Attributes:
        provider_id: Stable id.
        display_name: Human-readable name.
        type: ``ProviderType`` value.
        base_url: Base URL, no trailing slash.
        credential_sealed: The encrypted credential, or None.
        credential_hint: Redacted hint of the credential ("" for none).
        headers: Extra headers for every request.
        organization: Organisation id some providers take.
        local: A local server: its models are free (config only for now).
        enabled: Disabled providers are kept but their models are hidden.
        connect_timeout_ms: Connect timeout.
        read_timeout_ms: Read timeout.
        requests_per_minute: The provider's own RPM limit (0 = none).
        tokens_per_minute: The provider's own TPM limit (0 = none).
        source: "config" (declared in the config file) or "api".
        declared_models: Models the provider declares instead of a listing
            (a custom provider's ``custom.models``); empty: listed.
        health_status: ``HealthStatus`` value of the last listing.
        last_error: The last listing's error ("" when it worked).
        last_probe_time: When it was last listed.
        create_time: When it was created.
        update_time: When it last changed.
    """

    provider_id: str
    type: int
    base_url: str
    display_name: str = ""
    credential_sealed: bytes | None = None
    credential_hint: str = ""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    organization: str = ""
    local: bool = False
    enabled: bool = True
    connect_timeout_ms: int = DEFAULT_CONNECT_TIMEOUT_MS
    read_timeout_ms: int = DEFAULT_READ_TIMEOUT_MS
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    source: str = SOURCE_API
    declared_models: tuple[str, ...] = ()
    health_status: int = pb.HEALTH_STATUS_UNSPECIFIED
    last_error: str = ""
    last_probe_time: datetime.datetime | None = None
    create_time: datetime.datetime | None = None
    update_time: datetime.datetime | None = None


@dataclasses.dataclass(frozen=True)
class StoredModel:
    """A model row (``discovery.models``): what the provider's listing said.

    Attributes:
        provider_id: The provider.
        model_id: The provider's id for the model.
        context_window: As listed (0 when the provider does not say).
        max_output_tokens: As listed (0 when the provider does not say).
        loaded: For local servers, whether it was in memory.
        last_seen_time: When discovery last saw it.
        vram_bytes: For local servers, accelerator memory it takes when loaded.
        memory_bytes: For local servers, memory it takes in all when loaded.
    """

    provider_id: str
    model_id: str
    context_window: int = 0
    max_output_tokens: int = 0
    loaded: bool = False
    last_seen_time: datetime.datetime | None = None
    vram_bytes: int = 0
    memory_bytes: int = 0

    @property
    def name(self) -> str:
        """The catalog name, "<provider_id>/<model_id>"."""
        return model_name(self.provider_id, self.model_id)


def model_name(provider_id: str, model_id: str) -> str:
    """The name a model is known by in chat requests."""
    return f"{provider_id}/{model_id}"
