"""The routing decision: hard filters first, then the strategy's ranking.

Input is the request, the catalog (from discovery) and the tenant's policy;
output is a :class:`Decision` with the chosen model, the fallback chain and a
reason a human can read. This module is pure: no I/O, no clock, no grpc.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import chat_pb2, errors_pb2, identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.router import cost

MAX_FALLBACKS = 3
_UNKNOWN_LATENCY_MS = 5_000

_STRATEGY_NAMES = {
    identity_pb2.ROUTING_STRATEGY_COST: "cost",
    identity_pb2.ROUTING_STRATEGY_LATENCY: "latency",
    identity_pb2.ROUTING_STRATEGY_QUALITY: "quality",
    identity_pb2.ROUTING_STRATEGY_BALANCED: "balanced",
}


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which model answers, and what comes after it if it fails.

    Attributes:
        chain: The chosen model first, then the fallbacks, in order.
        reason: Why, for humans.
        strategy: The strategy applied.
        prompt_tokens: The estimated prompt size.
        max_tokens: The resolved output cap.
        excluded: (model name, filter) pairs removed by hard filters.
    """

    chain: Sequence[discovery_pb2.Model]
    reason: str
    strategy: identity_pb2.RoutingStrategy.ValueType
    prompt_tokens: int
    max_tokens: int
    excluded: Sequence[tuple[str, str]]

    @property
    def model(self) -> discovery_pb2.Model:
        """The chosen model."""
        return self.chain[0]

    def worst_case_micro_usd(self, model: discovery_pb2.Model | None = None) -> int:
        """The most the request can cost on ``model`` (default: the chosen one)."""
        chosen = model or self.model
        return cost.worst_case_micro_usd(self.prompt_tokens, self.max_tokens, chosen.pricing)


def _allowed(name: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _filter(
    model: discovery_pb2.Model,
    request: chat_service_pb2.ChatRequest,
    policy: account_pb2.TenantPolicy,
    needed_tokens: int,
) -> str | None:
    """The name of the first hard filter ``model`` fails, or None."""
    if not _allowed(model.name, policy.allowed_models):
        return "allowed_models"
    if model.health.status == discovery_pb2.HEALTH_STATUS_UNHEALTHY:
        return "unhealthy"
    if not cost.is_priced(model):
        return "unpriced"
    if model.context_window and needed_tokens > model.context_window:
        return "context_window"
    if request.tools and not model.capabilities.tools:
        return "tools"
    wants_images = any(
        part.WhichOneof("part") == "image_url" for m in request.messages for part in m.content
    )
    if wants_images and not model.capabilities.vision:
        return "vision"
    json_types = (
        chat_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
        chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
    )
    if request.generation.response_format.type in json_types and not model.capabilities.json_mode:
        return "json_mode"
    return None


def _score(
    model: discovery_pb2.Model,
    strategy: identity_pb2.RoutingStrategy.ValueType,
    weights: account_pb2.BalancedWeights,
    worst_case: int,
    max_cost: int,
) -> float:
    """Higher is better."""
    latency = model.health.ttft_p50_ms or _UNKNOWN_LATENCY_MS
    if strategy == identity_pb2.ROUTING_STRATEGY_COST:
        return -worst_case
    if strategy == identity_pb2.ROUTING_STRATEGY_LATENCY:
        return -latency
    if strategy == identity_pb2.ROUTING_STRATEGY_QUALITY:
        return model.quality
    # Balanced: each term normalised to 0..1 so the weights mean what they say.
    w_quality = weights.quality or 1.0
    w_cost = weights.cost or 1.0
    w_latency = weights.latency or 0.5
    cheapness = 1.0 - (worst_case / max_cost if max_cost else 0.0)
    speed = 1.0 - min(latency, _UNKNOWN_LATENCY_MS) / _UNKNOWN_LATENCY_MS
    return w_quality * model.quality + w_cost * cheapness + w_latency * speed


def resolve_pinned(name: str, models: Sequence[discovery_pb2.Model]) -> discovery_pb2.Model:
    """The model a request pins, by "provider/model" or bare model id.

    Raises:
        NotFound: MODEL_NOT_FOUND.
    """
    for model in models:
        if model.name == name:
            return model
    for model in models:
        if model.model_id == name:
            return model
    raise NotFound(
        errors_pb2.ERROR_REASON_MODEL_NOT_FOUND,
        f"no model named {name!r}; `orchestra models` lists them",
        metadata={"model": name},
        field="model",
    )


def decide(
    request: chat_service_pb2.ChatRequest,
    models: Sequence[discovery_pb2.Model],
    policy: account_pb2.TenantPolicy,
    *,
    default_max_tokens: int,
    default_model: str = "",
) -> Decision:
    """Chooses the model for ``request``.

    Raises:
        NotFound: MODEL_NOT_FOUND for a pinned model that does not exist.
        PermissionDenied: MODEL_NOT_ALLOWED for a pinned model the policy forbids.
        FailedPrecondition: NO_ELIGIBLE_MODEL or MAX_COST_EXCEEDED.
    """
    gen = request.generation
    max_tokens = gen.max_tokens if gen.HasField("max_tokens") else default_max_tokens
    prompt_tokens = cost.estimate_prompt_tokens(request.messages, request.tools)
    needed = prompt_tokens + max_tokens
    strategy = (
        request.routing.strategy
        or policy.routing_strategy
        or identity_pb2.ROUTING_STRATEGY_BALANCED
    )
    max_cost = request.routing.max_cost_micro_usd

    def build(
        chain: list[discovery_pb2.Model], reason: str, excluded: list[tuple[str, str]]
    ) -> Decision:
        return Decision(chain, reason, strategy, prompt_tokens, max_tokens, excluded)

    pinned_name = request.model or ""
    if pinned_name:
        model = resolve_pinned(pinned_name, models)
        failed = _filter(model, request, policy, needed)
        if failed == "allowed_models":
            raise PermissionDenied(
                errors_pb2.ERROR_REASON_MODEL_NOT_ALLOWED,
                f"the tenant's policy does not allow {model.name}",
                metadata={"model": model.name},
            )
        if failed == "context_window":
            raise _context_too_long(model, needed)
        if failed is not None:
            raise _no_model(f"pinned model {model.name} fails the {failed} filter", failed)
        fallbacks = [resolve_pinned(n, models) for n in request.routing.fallback_models]
        decision = build([model, *fallbacks], f"pinned to {model.name} by the request", [])
        _check_max_cost(decision, max_cost)
        return decision

    excluded: list[tuple[str, str]] = []
    eligible: list[discovery_pb2.Model] = []
    for model in models:
        failed = _filter(model, request, policy, needed)
        if failed is None:
            eligible.append(model)
        else:
            excluded.append((model.name, failed))
    if not eligible:
        filters = ",".join(sorted({f for _, f in excluded})) or "no models known"
        raise _no_model(f"no model passes the filters ({filters})", filters)
    costs = {
        m.name: cost.worst_case_micro_usd(prompt_tokens, max_tokens, m.pricing) for m in eligible
    }
    if max_cost:
        affordable = [m for m in eligible if costs[m.name] <= max_cost]
        if not affordable:
            raise FailedPrecondition(
                errors_pb2.ERROR_REASON_MAX_COST_EXCEEDED,
                f"the cheapest eligible model needs {min(costs.values())} micro-USD, "
                f"above max_cost_micro_usd={max_cost}",
                metadata={"cheapest_micro_usd": str(min(costs.values()))},
            )
        eligible = affordable
    top_cost = max(costs.values()) or 1
    ranked = sorted(
        eligible,
        key=lambda m: (
            m.name != default_model,  # the operator's default wins ties
            -_score(m, strategy, policy.balanced_weights, costs[m.name], top_cost),
            m.name,
        ),
    )
    chosen = ranked[0]
    reason = (
        f"{_STRATEGY_NAMES.get(strategy, 'balanced')} strategy chose {chosen.name} "
        f"(quality {chosen.quality:.2f}, worst case {costs[chosen.name]} micro-USD) "
        f"from {len(eligible)} eligible of {len(models)} models"
    )
    return build(ranked[: 1 + MAX_FALLBACKS], reason, excluded)


def _check_max_cost(decision: Decision, max_cost: int) -> None:
    worst = decision.worst_case_micro_usd()
    if max_cost and worst > max_cost:
        raise FailedPrecondition(
            errors_pb2.ERROR_REASON_MAX_COST_EXCEEDED,
            f"{decision.model.name} may cost {worst} micro-USD, "
            f"above max_cost_micro_usd={max_cost}",
            metadata={"worst_case_micro_usd": str(worst)},
        )


def _no_model(message: str, filters: str) -> FailedPrecondition:
    return FailedPrecondition(
        errors_pb2.ERROR_REASON_NO_ELIGIBLE_MODEL, message, metadata={"filters": filters}
    )


def _context_too_long(model: discovery_pb2.Model, needed: int) -> InvalidArgument:
    return InvalidArgument(
        errors_pb2.ERROR_REASON_CONTEXT_TOO_LONG,
        f"prompt plus max_tokens needs about {needed} tokens; "
        f"{model.name} has a context window of {model.context_window}",
        metadata={"needed_tokens": str(needed), "context_window": str(model.context_window)},
    )
