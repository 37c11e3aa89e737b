"""Health and latency probes: a tiny timed chat request per provider, on a schedule.

What is probed: each round probes every enabled provider once, with **one**
of its models, taken in turn (round-robin by model id). Not every model every
round: a provider with 50 models would get 50 billed requests a minute from
each installation, and what usually fails is the provider (network, outage,
rate limit), which any of its models shows. Each model still gets its own
figures every ``n_models`` rounds, and a model that alone fails (removed
upstream, not loaded) turns unhealthy on its own. A model's state is the
worst of its provider's and its own (see :func:`catalog.combined_health`).

How: the request (:func:`services.providers.probe.probe_request`) goes
through the router's own provider adapter
(:func:`services.providers.adapter_for`), so each wire format is
probed exactly as chat traffic uses it (streaming, headers, auth). The probe
asks for a few tokens (``PROBE_MAX_TOKENS``) and measures time to the first
token and the speed of the tokens after it.

Where: the schedule lives in PostgreSQL (``providers.next_probe_time``);
each replica claims due providers with ``SKIP LOCKED``, so a provider is
probed once per interval however many replicas run, and the statistics are
shared through ``discovery.probe_stats``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from services.common.config_file import ProviderEntry
from services.common.crypto import CredentialCipher, CredentialError, scrub
from services.discovery import health, providers
from services.discovery.config import ProbeConfig
from services.discovery.health import Outcome, ProbeStats
from services.discovery.probe_store import ProbeStore
from services.discovery.records import ProviderRecord, model_name
from services.providers import ProviderType, adapter_base_url, adapter_for
from services.providers.base import (
    ProviderAdapter,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    UsageReport,
)
from services.providers.probe import probe_request

log = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 300


def provider_entry(record: ProviderRecord, credential: str) -> ProviderEntry:
    """The router's view of a provider, to build its adapter.

    Discovery accepts base URLs as operators paste them (an Anthropic URL
    with ``/v1``, Ollama's OpenAI-compatible ``/v1``); the adapters add
    their own path, so those suffixes are removed as listing does.

    Raises:
        ValueError: A type the router's configuration does not know.
    """
    kind = ProviderType(record.type)
    return ProviderEntry(
        id=record.provider_id,
        type=kind.config_name,
        base_url=adapter_base_url(kind, record.base_url),
        credential=credential,
        headers=dict(record.headers),
        organization=record.organization,
        local=record.local,
        enabled=record.enabled,
        connect_timeout_seconds=record.connect_timeout_ms / 1000,
        read_timeout_seconds=record.read_timeout_ms / 1000,
    )


async def measure(
    adapter: ProviderAdapter,
    model_id: str,
    timeout: float,  # noqa: ASYNC109 - bounds the probe, recorded as its error
    *,
    secrets: Sequence[str] = (),
) -> Outcome:
    """Sends one probe through ``adapter`` and times it.

    Args:
        adapter: The provider's adapter.
        model_id: The model to ask.
        timeout: Seconds the whole probe may take.
        secrets: The provider's credential and header values, scrubbed from
            any error text (a provider may echo the key it was given).
    """
    now = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    first: float | None = None
    last = started
    deltas = 0
    reported: int | None = None
    try:
        async with asyncio.timeout(timeout):
            async for event in adapter.stream(probe_request(model_id, timeout)):
                if isinstance(event, TextDelta | ToolCallDelta):
                    last = time.monotonic()
                    first = last if first is None else first
                    deltas += 1
                elif isinstance(event, UsageReport):
                    reported = event.completion_tokens
    except UpstreamError as exc:
        return Outcome(
            False, None, None, _short(scrub(f"{exc.kind.value}: {exc}", *secrets)), model_id, now
        )
    except TimeoutError:
        if first is None:
            error = f"timeout: no token within {timeout:g}s"
            return Outcome(False, None, None, error, model_id, now)
        # It answered, only slowly (a busy local model): a pass, measured so far.
    end = time.monotonic()
    # A reply without text (only a finish) still answered: its first "token" is the end.
    ttft = (first if first is not None else end) - started
    tokens = reported if reported else deltas
    speed = (
        (tokens - 1) / (last - first) if first is not None and tokens > 1 and last > first else None
    )
    return Outcome(True, ttft * 1000, speed, "", model_id, now)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


class Prober:
    """Runs probes and records their statistics."""

    def __init__(
        self,
        store: ProbeStore,
        cipher: CredentialCipher,
        options: ProbeConfig,
        on_change: Callable[[str], Awaitable[object]],
    ) -> None:
        """Creates the prober.

        Args:
            store: Where the schedule and statistics live.
            cipher: Opens stored credentials.
            options: Schedule and thresholds.
            on_change: Called with each provider id a round probed (rebuilds
                and publishes that provider's part of the catalog).
        """
        self._store = store
        self._cipher = cipher
        self.options = options
        self._on_change = on_change
        self._gate = asyncio.Semaphore(options.concurrency)
        # provider id -> (the row's update_time when built, its adapter)
        self._adapters: dict[str, tuple[object, ProviderAdapter]] = {}

    async def run_once(self, *, force: bool = False) -> int:
        """Probes every provider that is due (every enabled one with ``force``).

        Returns:
            The number of providers probed.
        """
        claimed = await self._store.claim_due_probes(
            self.options.interval_seconds, self.options.batch, force=force
        )
        if not claimed:
            return 0
        await asyncio.gather(
            *(self._claimed(r, ids[cursor % len(ids)]) for r, ids, cursor in claimed)
        )
        return len(claimed)

    async def run_forever(self) -> None:
        """Probes due providers every tick until cancelled."""
        while True:
            # Sleep first: at start, discovery's first pass has not listed the models yet.
            await asyncio.sleep(self.options.tick_seconds)
            try:
                await self.run_once()
            except Exception:  # the schedule must survive a bad round
                log.exception("probe round failed")

    async def probe(
        self, record: ProviderRecord, model_id: str, *, limit: float | None = None
    ) -> tuple[Outcome, ProbeStats] | None:
        """Probes ``model_id`` of ``record`` now and records the result.

        Args:
            record: The provider.
            model_id: One of its models.
            limit: Seconds the probe may take (default: the options').

        Returns:
            The outcome, and the provider's statistics after it; None when no
            adapter speaks the provider's type (it is not probed at all,
            rather than marked unhealthy for a gap of the gateway's).
        """
        async with self._gate:
            outcome = await self._measure(record, model_id, limit or self.options.timeout_seconds)
        if outcome is None:
            return None
        policy = self.options.policy
        name = model_name(record.provider_id, model_id)
        await self._store.update_probe_stats(
            record.provider_id, name, lambda s: health.record(s, outcome, policy)
        )
        stats = await self._store.update_probe_stats(
            record.provider_id, record.provider_id, lambda s: health.record(s, outcome, policy)
        )
        if not outcome.ok:
            log.warning("probe of %s failed: %s", name, outcome.error)
        return outcome, stats or ProbeStats()

    async def aclose(self) -> None:
        """Closes every adapter's connections."""
        adapters = [a for _, a in self._adapters.values()]
        self._adapters.clear()
        await asyncio.gather(*(a.aclose() for a in adapters), return_exceptions=True)

    async def _claimed(self, record: ProviderRecord, model_id: str) -> None:
        try:
            await self.probe(record, model_id)
            await self._on_change(record.provider_id)
        except Exception:  # one provider's bug must not end the round
            log.exception("probe of provider %s failed", record.provider_id)

    async def _measure(self, record: ProviderRecord, model_id: str, limit: float) -> Outcome | None:
        now = datetime.datetime.now(datetime.UTC)
        try:
            endpoint = providers.endpoint(record, self._cipher)
        except CredentialError as exc:
            return Outcome(False, None, None, f"credential: {exc}", model_id, now)
        adapter = await self._adapter(record, endpoint.credential)
        if adapter is None:
            log.debug("provider %s: no adapter for its type; not probed", record.provider_id)
            return None
        secrets = (endpoint.credential, *endpoint.headers.values())
        return await measure(adapter, model_id, limit, secrets=secrets)

    async def _adapter(self, record: ProviderRecord, secret: str) -> ProviderAdapter | None:
        cached = self._adapters.get(record.provider_id)
        if cached is not None and cached[0] == record.update_time:
            return cached[1]
        try:
            adapter = adapter_for(provider_entry(record, secret))
        except ValueError:  # pydantic's ValidationError included
            return None  # a type the router's configuration does not know
        if adapter is None:
            return None
        self._adapters[record.provider_id] = (record.update_time, adapter)
        if cached is not None:
            await cached[1].aclose()  # the provider changed: its old connections go
        return adapter
