"""The packaged model catalog and how it merges with what listing finds.

``catalog.yaml`` (beside this module) holds prices, limits, capabilities and a
quality tier for well-known models. :meth:`Catalog.lookup` matches a listed
model id to an entry; :func:`build_model` combines the listing, the entry and
the provider into the ``Model`` that GetModel, ListModels and WatchModels
return. Pricing rules: a model of a ``local`` provider costs nothing
(PRICE_SOURCE_LOCAL); otherwise the catalog price (PRICE_SOURCE_CATALOG);
otherwise zero prices with PRICE_SOURCE_UNSPECIFIED, which the router treats
as unpriced, never as free.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.common.config_file import PriceOverride
from services.discovery.health import ProbeStats, to_health, worst
from services.discovery.records import ProviderRecord, StoredModel

# What may follow a catalog id in a dated or pinned variant of the same model:
# "-2024-08-06", "-20241022", "-0125", "-001", "-latest", "@20250514".
_MAX_CACHED = 100_000
_DATED_SUFFIX = re.compile(r"^[-@](\d{4}-\d{2}-\d{2}|\d{8}|\d{3,4}|latest)$")


class CatalogError(ValueError):
    """The catalog file does not validate (a packaging bug)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceEntry(_Strict):
    """Micro-USD per million tokens."""

    input: int = Field(ge=0)
    output: int = Field(ge=0)
    cached_input: int = Field(default=0, ge=0)


class CapabilityEntry(_Strict):
    """What the model can do."""

    tools: bool = False
    vision: bool = False
    json_mode: bool = False
    streaming: bool = True


class CatalogEntry(_Strict):
    """One model of the catalog."""

    id: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    context_window: int = Field(default=0, ge=0)
    max_output_tokens: int = Field(default=0, ge=0)
    pricing: PriceEntry | None = None
    capabilities: CapabilityEntry = Field(default_factory=CapabilityEntry)
    quality: float = Field(default=0.0, ge=0.0, le=1.0)


class CatalogFile(_Strict):
    """The whole file."""

    version: int
    models: list[CatalogEntry]


class Catalog:
    """Catalog entries indexed by lower-cased id and alias, and operator prices."""

    def __init__(
        self, entries: Iterable[CatalogEntry], overrides: Iterable[PriceOverride] = ()
    ) -> None:
        # Operator prices by full name or bare model id (see PriceOverride).
        self._prices: dict[str, PriceEntry] = {
            o.model: PriceEntry(
                input=round(o.input_usd_per_mtok * 1_000_000),
                output=round(o.output_usd_per_mtok * 1_000_000),
                cached_input=round(o.cached_input_usd_per_mtok * 1_000_000),
            )
            for o in overrides
        }
        self._by_key: dict[str, CatalogEntry] = {}
        # Listed id -> entry: a pass looks up the same thousands of ids each time.
        self._found: dict[str, CatalogEntry | None] = {}
        for entry in entries:
            for key in (entry.id, *entry.aliases):
                self._by_key[key.lower()] = entry

    @classmethod
    def packaged(cls, overrides: Iterable[PriceOverride] = ()) -> Catalog:
        """The catalog shipped with the package, with the operator's prices."""
        text = (resources.files("services.discovery") / "catalog.yaml").read_text()
        return cls.parse(text, overrides)

    @classmethod
    def parse(cls, text: str, overrides: Iterable[PriceOverride] = ()) -> Catalog:
        """Parses a catalog document.

        Raises:
            CatalogError: It does not validate.
        """
        try:
            return cls(CatalogFile.model_validate(yaml.safe_load(text)).models, overrides)
        except (ValidationError, yaml.YAMLError) as exc:
            raise CatalogError(f"model catalog does not validate: {exc}") from None

    def override(self, name: str, model_id: str) -> PriceEntry | None:
        """The operator's price for this model (by full name, then bare id), or None."""
        return self._prices.get(name) or self._prices.get(model_id)

    def lookup(self, model_id: str) -> CatalogEntry | None:
        """The entry for a listed model id, or None.

        Tries the id as listed, then without an "org/" prefix
        ("meta-llama/Llama-3.1-8B-Instruct") and without Ollama's ":latest";
        for each, an exact id or alias first, then the longest id that the
        candidate extends by a dated suffix ("gpt-4o-2024-08-06" -> "gpt-4o").
        """
        if model_id in self._found:
            return self._found[model_id]
        if len(self._found) >= _MAX_CACHED:
            self._found.clear()  # bounded; refills within one pass
        entry = self._lookup(model_id)
        self._found[model_id] = entry
        return entry

    def _lookup(self, model_id: str) -> CatalogEntry | None:
        for candidate in _candidates(model_id):
            entry = self._by_key.get(candidate)
            if entry is not None:
                return entry
        for candidate in _candidates(model_id):
            entry = self._dated(candidate)
            if entry is not None:
                return entry
        return None

    def _dated(self, candidate: str) -> CatalogEntry | None:
        best: tuple[int, CatalogEntry] | None = None
        for key, entry in self._by_key.items():
            dated = candidate.startswith(key) and _DATED_SUFFIX.match(candidate[len(key) :])
            if dated and (best is None or len(key) > best[0]):
                best = (len(key), entry)
        return best[1] if best else None


def _candidates(model_id: str) -> Sequence[str]:
    lowered = model_id.strip().lower()
    forms = [lowered, lowered.rsplit("/", 1)[-1]]
    forms += [f.removesuffix(":latest") for f in forms]
    return list(dict.fromkeys(forms))


def build_model(
    stored: StoredModel,
    provider: ProviderRecord,
    catalog: Catalog,
    stats: Mapping[str, ProbeStats] | None = None,
) -> pb.Model:
    """The catalog view of a listed model.

    Args:
        stored: What listing found.
        provider: Its provider (type, ``local``, health).
        catalog: The packaged catalog.
        stats: Probe statistics by subject (provider id, model name).
    """
    entry = catalog.lookup(stored.model_id)
    model = pb.Model(
        name=stored.name,
        provider_id=stored.provider_id,
        model_id=stored.model_id,
        provider_type=pb.ProviderType.ValueType(provider.type),
        # The running server knows its real limits (vLLM's max_model_len,
        # Gemini's token limits) better than a catalog written in advance.
        context_window=stored.context_window or (entry.context_window if entry else 0),
        max_output_tokens=stored.max_output_tokens or (entry.max_output_tokens if entry else 0),
        loaded=stored.loaded,
        quality=entry.quality if entry else 0.0,
        health=combined_health(provider, stats or {}, stored.name),
        vram_bytes=stored.vram_bytes,
        memory_bytes=stored.memory_bytes,
    )
    caps = entry.capabilities if entry else CapabilityEntry()
    model.capabilities.CopyFrom(
        pb.Capabilities(
            tools=caps.tools, vision=caps.vision, json_mode=caps.json_mode, streaming=caps.streaming
        )
    )
    override = catalog.override(stored.name, stored.model_id)
    price = override or (entry.pricing if entry is not None else None)
    if override is not None:
        model.price_source = pb.PRICE_SOURCE_OVERRIDE
    elif provider.local:
        model.price_source = pb.PRICE_SOURCE_LOCAL
        price = PriceEntry(input=0, output=0)
    elif price is not None:
        model.price_source = pb.PRICE_SOURCE_CATALOG
    if price is not None and model.price_source != pb.PRICE_SOURCE_UNSPECIFIED:
        model.pricing.CopyFrom(
            pb.Pricing(
                input_micro_usd_per_mtok=price.input,
                output_micro_usd_per_mtok=price.output,
                cached_input_micro_usd_per_mtok=price.cached_input,
            )
        )
    else:
        model.price_source = pb.PRICE_SOURCE_UNSPECIFIED
    if stored.last_seen_time is not None:
        model.last_seen_time.FromDatetime(stored.last_seen_time)
    return model


def combined_health(
    provider: ProviderRecord, stats: Mapping[str, ProbeStats], model_name: str | None = None
) -> pb.Health:
    """The health of a provider, or of one of its models.

    The state is the worst of the provider's last listing, the provider's
    probes and (for a model) the model's own probes, so a provider that is
    down takes all its models down. The latency figures are the model's own
    once it has been probed, else the provider's (its models are probed in
    turn, and share the provider's network path and load).
    """
    provider_stats = stats.get(provider.provider_id)
    model_stats = stats.get(model_name) if model_name else None
    source = model_stats or provider_stats
    health = to_health(source) if source is not None else pb.Health()
    states = [provider.health_status]
    states += [s.status for s in (provider_stats, model_stats) if s is not None]
    health.status = worst(*states)  # type: ignore[assignment]
    if provider.health_status == pb.HEALTH_STATUS_UNHEALTHY and provider.last_error:
        health.last_error = provider.last_error  # the listing failed: say that first
    elif not health.last_error and provider_stats is not None:
        health.last_error = provider_stats.last_error
    times = [t for t in (provider.last_probe_time, health_time(health)) if t is not None]
    if times:
        health.last_probe_time.FromDatetime(max(times))
    return health


def health_time(health: pb.Health) -> datetime.datetime | None:
    """``health.last_probe_time`` as a datetime, None when unset."""
    if not health.HasField("last_probe_time"):
        return None
    return health.last_probe_time.ToDatetime(datetime.UTC)
