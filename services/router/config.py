"""The router's own settings, read once at start and frozen.

They come from the suite's :class:`~services.common.settings.Settings` (the
environment and the config file), never from the environment directly:

| setting | source | default | meaning |
| --- | --- | --- | --- |
| ``redis_url`` | ``REDIS_URL`` / ``server.redis_url`` | required | learned stats, breakers, batches, outbox |
| ``default_model`` | ``routing.default_model`` | "" | the operator's default model, which wins ties |
| ``default_max_tokens`` | ``routing.default_max_tokens`` | 512 | output cap when a request sets none |
| ``max_request_bytes`` | ``routing.max_request_bytes`` | 1048576 | larger requests are refused |
| ``internal_key`` | ``ORCHESTRA_INTERNAL_KEY`` | required | salts the audit record's digests, seals ENCRYPTED bodies |
| ``providers`` | ``providers:`` | none | the providers the router has adapters for |
"""  # noqa: E501 - a table reads better unwrapped

from __future__ import annotations

import dataclasses

from services.common.config_file import ProviderEntry
from services.common.settings import Settings, require

# How long start-up waits for discovery's first catalog before serving anyway.
CATALOG_WAIT_SECONDS = 15.0


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Router settings the engine needs.

    Attributes:
        default_max_tokens: The output cap when a request sets none.
        default_model: The operator's default model, which wins ties.
        max_request_bytes: The largest request accepted.
        internal_key: Salts the prompt and answer digests in audit records and
            seals ENCRYPTED bodies for the audit service.
    """

    default_max_tokens: int = 512
    default_model: str = ""
    max_request_bytes: int = 1_048_576
    internal_key: bytes = b""


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Everything the router process reads from its settings.

    Attributes:
        redis_url: The router's Redis.
        engine: What the engine needs.
        providers: The configured providers (enabled or not).
        catalog_wait_seconds: How long start-up waits for the first catalog.
    """

    redis_url: str
    engine: EngineConfig = EngineConfig()
    providers: tuple[ProviderEntry, ...] = ()
    catalog_wait_seconds: float = CATALOG_WAIT_SECONDS

    @classmethod
    def from_settings(cls, settings: Settings) -> RouterConfig:
        """Reads the router's part of ``settings``.

        Raises:
            SettingsError: REDIS_URL is not set.
        """
        routing = settings.config.routing
        return cls(
            redis_url=require(settings.redis_url, "REDIS_URL", "router"),
            engine=EngineConfig(
                default_max_tokens=routing.default_max_tokens,
                default_model=routing.default_model,
                max_request_bytes=routing.max_request_bytes,
                internal_key=settings.internal_key,
            ),
            providers=tuple(settings.config.providers),
        )
