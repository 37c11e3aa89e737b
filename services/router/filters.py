"""The routing policy's filters: which catalog models may answer a request at all.

Hard filters (the tenant's allow-list, health, price, context window, tools,
vision, JSON mode) and the per-request caps (``max_cost_micro_usd``, the soft
``max_latency_ms``), plus the refusals they lead to. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping, Sequence

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import chat_pb2, errors_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.router import cost
from services.router.context import PromptFeatures
from services.router.decision import Decision

_JSON_TYPES = (
    chat_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
)


def _allowed(name: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def hard_filter(
    model: discovery_pb2.Model,
    request: chat_service_pb2.ChatRequest,
    policy: account_pb2.TenantPolicy,
    needed_tokens: int,
    features: PromptFeatures,
    *,
    ignore_health: bool = False,
) -> str | None:
    """The name of the first hard filter ``model`` fails, or None."""
    if not _allowed(model.name, policy.allowed_models):
        return "allowed_models"
    if not ignore_health and model.health.status == discovery_pb2.HEALTH_STATUS_UNHEALTHY:
        return "unhealthy"
    if not cost.is_priced(model):
        return "unpriced"
    if model.context_window and needed_tokens > model.context_window:
        return "context_window"
    if request.tools and not model.capabilities.tools:
        return "tools"
    if features.wants_images and not model.capabilities.vision:
        return "vision"
    if request.generation.response_format.type in _JSON_TYPES and not model.capabilities.json_mode:
        return "json_mode"
    return None


@dataclasses.dataclass(frozen=True)
class Eligible:
    """The models that pass the hard filters.

    Attributes:
        models: The eligible models, in catalog order.
        excluded: (model name, filter) pairs of the others.
        panic: Whether every fitting model is marked unhealthy, so they are
            all eligible anyway.
    """

    models: list[discovery_pb2.Model]
    excluded: list[tuple[str, str]]
    panic: bool


def eligible(
    models: Sequence[discovery_pb2.Model],
    request: chat_service_pb2.ChatRequest,
    policy: account_pb2.TenantPolicy,
    needed_tokens: int,
    features: PromptFeatures,
) -> Eligible:
    """The models that may answer ``request``.

    Raises:
        FailedPrecondition: NO_ELIGIBLE_MODEL when none may.
    """
    excluded: list[tuple[str, str]] = []
    passed: list[discovery_pb2.Model] = []
    for model in models:
        failed = hard_filter(model, request, policy, needed_tokens, features)
        if failed is None:
            passed.append(model)
        else:
            excluded.append((model.name, failed))
    panic = False
    if not passed:
        # Every model that fits is marked unhealthy: try them anyway rather than
        # refuse everything (probes can be wrong, e.g. a busy local model); the
        # retries, fallbacks and breakers still protect the request.
        passed = [
            m
            for m in models
            if hard_filter(m, request, policy, needed_tokens, features, ignore_health=True) is None
        ]
        panic = bool(passed)
    if not passed:
        filters = ",".join(sorted({f for _, f in excluded})) or "no models known"
        raise no_model(f"no model passes the filters ({filters})", filters)
    return Eligible(passed, excluded, panic)


def affordable(
    models: list[discovery_pb2.Model], costs: Mapping[str, int], max_cost: int
) -> list[discovery_pb2.Model]:
    """The models whose worst case fits ``max_cost`` (0: no cap).

    Raises:
        FailedPrecondition: MAX_COST_EXCEEDED when none does.
    """
    if not max_cost:
        return models
    fitting = [m for m in models if costs[m.name] <= max_cost]
    if not fitting:
        raise FailedPrecondition(
            errors_pb2.ERROR_REASON_MAX_COST_EXCEEDED,
            f"the cheapest eligible model needs {min(costs.values())} micro-USD, "
            f"above max_cost_micro_usd={max_cost}",
            metadata={"cheapest_micro_usd": str(min(costs.values()))},
        )
    return fitting


def fast_enough(
    models: list[discovery_pb2.Model],
    ttft_ms: Callable[[discovery_pb2.Model], float],
    max_latency_ms: int,
) -> tuple[list[discovery_pb2.Model], list[tuple[str, str]]]:
    """The soft ``max_latency_ms`` cap: (the models kept, the ones dropped).

    A model whose time-to-first-token estimate exceeds the cap is dropped; one
    with no estimate yet (0) is kept. When every model would be dropped, the
    one with the lowest estimate is kept. ``max_latency_ms`` 0 (or less): no cap.
    """
    if max_latency_ms <= 0:
        return models, []
    kept = [m for m in models if ttft_ms(m) <= max_latency_ms]  # unknown (0) is kept
    if not kept:
        kept = [min(models, key=lambda m: (ttft_ms(m), m.name))]
    names = {m.name for m in kept}
    return kept, [(m.name, "max_latency") for m in models if m.name not in names]


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


def check_max_cost(decision: Decision, max_cost: int) -> None:
    """Refuses a decision whose chosen model may cost more than ``max_cost``.

    Raises:
        FailedPrecondition: MAX_COST_EXCEEDED.
    """
    worst = decision.worst_case_micro_usd()
    if max_cost and worst > max_cost:
        raise FailedPrecondition(
            errors_pb2.ERROR_REASON_MAX_COST_EXCEEDED,
            f"{decision.model.name} may cost {worst} micro-USD, "
            f"above max_cost_micro_usd={max_cost}",
            metadata={"worst_case_micro_usd": str(worst)},
        )


def no_model(message: str, filters: str) -> FailedPrecondition:
    """NO_ELIGIBLE_MODEL, naming the filters that removed the models."""
    return FailedPrecondition(
        errors_pb2.ERROR_REASON_NO_ELIGIBLE_MODEL, message, metadata={"filters": filters}
    )


def context_too_long(model: discovery_pb2.Model, needed: int) -> InvalidArgument:
    """CONTEXT_TOO_LONG for a prompt plus max_tokens beyond ``model``'s window."""
    return InvalidArgument(
        errors_pb2.ERROR_REASON_CONTEXT_TOO_LONG,
        f"prompt plus max_tokens needs about {needed} tokens; "
        f"{model.name} has a context window of {model.context_window}",
        metadata={"needed_tokens": str(needed), "context_window": str(model.context_window)},
    )
