"""The routing decision: hard filters first, then the strategy's ranking.

Input is the request, the catalog (from discovery) and the tenant's policy;
output is a :class:`Decision` with the chosen model, the fallback chain, a
reason a human can read, the task analysis and a confidence. This module does
no I/O and imports no grpc; its one stateful input is the learned policy
(:mod:`services.router.learning`), whose in-memory snapshot gives the
``balanced`` and ``quality`` strategies a per-prompt quality estimate in place
of the catalog's single number (with nothing learned yet, the two agree), and
lets ``balanced`` explore within the tenant's bound.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence

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
from services.router import cost, learning, tasks

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
        task: The task analysis of the prompt.
        confidence: How sure the policy is of the first choice, 0-1.
        explored: Whether the learned policy explored (followed a posterior
            sample rather than its best estimate).
        expected_quality: The chosen model's expected quality for this prompt
            (learned, or the catalog's when nothing was learned).
    """

    chain: Sequence[discovery_pb2.Model]
    reason: str
    strategy: identity_pb2.RoutingStrategy.ValueType
    prompt_tokens: int
    max_tokens: int
    excluded: Sequence[tuple[str, str]]
    task: tasks.TaskAnalysis | None = None
    confidence: float = 1.0
    explored: bool = False
    expected_quality: float = 0.0

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


def quality_weight(weights: account_pb2.BalancedWeights) -> float:
    """The balanced strategy's weight of quality (1 when unset)."""
    return weights.quality or 1.0


def _score(
    model: discovery_pb2.Model,
    strategy: identity_pb2.RoutingStrategy.ValueType,
    weights: account_pb2.BalancedWeights,
    worst_case: int,
    max_cost: int,
    quality: float,
    ttft_ms: float,
) -> float:
    """Higher is better.

    ``quality`` is the expected quality for this prompt (learned, or the
    catalog's) and ``ttft_ms`` the expected time to first token (0: unknown).
    """
    latency = ttft_ms or _UNKNOWN_LATENCY_MS
    if strategy == identity_pb2.ROUTING_STRATEGY_COST:
        return -worst_case
    if strategy == identity_pb2.ROUTING_STRATEGY_LATENCY:
        return -latency
    if strategy == identity_pb2.ROUTING_STRATEGY_QUALITY:
        return quality
    # Balanced: each term normalised to 0..1 so the weights mean what they say.
    w_cost = weights.cost or 1.0
    w_latency = weights.latency or 0.5
    cheapness = 1.0 - (worst_case / max_cost if max_cost else 0.0)
    speed = 1.0 - min(latency, _UNKNOWN_LATENCY_MS) / _UNKNOWN_LATENCY_MS
    return quality_weight(weights) * quality + w_cost * cheapness + w_latency * speed


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
    tenant_id: str = "",
    learner: learning.Learner | None = None,
) -> Decision:
    """Chooses the model for ``request``.

    Args:
        request: The chat request.
        models: The catalog.
        policy: The tenant's policy.
        default_max_tokens: The output cap when the request sets none.
        default_model: The operator's default, which wins ties.
        tenant_id: Whose learned state to use (default: the tenant of the RPC
            being served, :data:`learning.current_tenant`; none: no learning).
        learner: The learned policy (default: the process's installed one).

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
    text = tasks.prompt_text(request.messages)
    task = tasks.analyze(text, request.routing.task_type)

    def build(
        chain: list[discovery_pb2.Model], reason: str, excluded: list[tuple[str, str]]
    ) -> Decision:
        return Decision(
            chain,
            reason,
            strategy,
            prompt_tokens,
            max_tokens,
            excluded,
            task,
            expected_quality=chain[0].quality,
        )

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
        decision = build(
            [model, *fallbacks], f"pinned to {model.name} by the request ({task.describe()})", []
        )
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
    panic = False
    if not eligible:
        # Every model that fits is marked unhealthy: try them anyway rather than
        # refuse everything (probes can be wrong, e.g. a busy local model); the
        # retries, fallbacks and breakers still protect the request.
        eligible = [
            m for m in models if _filter(m, request, policy, needed, ignore_health=True) is None
        ]
        panic = bool(eligible)
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
    learned = _learned(strategy, eligible, text, task, policy, tenant_id, learner)
    weights = policy.balanced_weights

    def rank(quality: Mapping[str, float]) -> list[discovery_pb2.Model]:
        return sorted(
            eligible,
            key=lambda m: (
                m.name != default_model,  # the operator's default wins ties
                -_score(
                    m,
                    strategy,
                    weights,
                    costs[m.name],
                    top_cost,
                    quality[m.name],
                    _ttft(m, learned),
                ),
                m.name,
            ),
        )

    greedy = {m.name: m.quality for m in eligible}
    if learned is not None:
        greedy = {name: e.expected_quality() for name, e in learned.estimates.items()}
    ranked = rank(greedy)
    explored = False
    if learned is not None and learned.sampled is not None:
        ranked_sampled = rank(learned.sampled)
        explored = ranked_sampled[0].name != ranked[0].name
        ranked = ranked_sampled
    chosen = ranked[0]
    confidence = _confidence(ranked, greedy, strategy, weights, costs, top_cost, learned)
    if learned is not None:
        estimate = learned.estimates[chosen.name]
        about = (
            f"learned quality {greedy[chosen.name]:.2f}±{estimate.spread:.2f} "
            f"from {estimate.observations:.0f} rated answers"
        )
    else:
        about = f"quality {chosen.quality:.2f}"
    reason = (
        f"{_STRATEGY_NAMES.get(strategy, 'balanced')} strategy chose {chosen.name} "
        f"for a {task.describe()} ({about}, worst case {costs[chosen.name]} micro-USD, "
        f"confidence {confidence:.2f}) from {len(eligible)} eligible of {len(models)} models"
        + ("; exploring" if explored else "")
        + ("; every fitting model is marked unhealthy, so trying them anyway" if panic else "")
    )
    return dataclasses.replace(
        build(ranked[: 1 + MAX_FALLBACKS], reason, excluded),
        confidence=confidence,
        explored=explored,
        expected_quality=min(max(greedy[chosen.name], 0.0), 1.0),
    )


@dataclasses.dataclass(frozen=True)
class _Learned:
    estimates: Mapping[str, learning.Estimate]
    sampled: Mapping[str, float] | None


def _learned(
    strategy: identity_pb2.RoutingStrategy.ValueType,
    eligible: Sequence[discovery_pb2.Model],
    text: str,
    task: tasks.TaskAnalysis,
    policy: account_pb2.TenantPolicy,
    tenant_id: str,
    learner: learning.Learner | None,
) -> _Learned | None:
    """The learned estimates (and, when exploring, a posterior sample) or None."""
    if strategy not in (
        identity_pb2.ROUTING_STRATEGY_BALANCED,
        identity_pb2.ROUTING_STRATEGY_QUALITY,
    ):
        return None
    tenant = tenant_id
    if learner is None or not tenant or len(eligible) < 2:
        return None
    x = learner.featurize(text, task)
    estimates = learner.estimates(tenant, x, [(m.name, m.quality) for m in eligible])
    sampled = None
    if strategy == identity_pb2.ROUTING_STRATEGY_BALANCED and learner.may_explore(
        tenant, policy.max_exploration_rate
    ):
        sampled = {n: e.expected_quality(learner.sample(e)) for n, e in estimates.items()}
    return _Learned(estimates, sampled)


def _ttft(model: discovery_pb2.Model, learned: _Learned | None) -> float:
    """Probed time to first token, else the observed mean, else 0 (unknown)."""
    if model.health.ttft_p50_ms:
        return float(model.health.ttft_p50_ms)
    if learned is not None and model.name in learned.estimates:
        return learned.estimates[model.name].mean_ttft_ms
    return 0.0


def _confidence(
    ranked: Sequence[discovery_pb2.Model],
    quality: Mapping[str, float],
    strategy: identity_pb2.RoutingStrategy.ValueType,
    weights: account_pb2.BalancedWeights,
    costs: Mapping[str, int],
    top_cost: int,
    learned: _Learned | None,
) -> float:
    """P(first choice beats the runner-up) under the quality posterior.

    Without learned estimates (cost, latency, or nothing learned yet), 1 for a
    strict winner and 0.5 for a tie.
    """
    if len(ranked) < 2:
        return 1.0
    first, second = ranked[0], ranked[1]

    def score(m: discovery_pb2.Model) -> float:
        return _score(
            m, strategy, weights, costs[m.name], top_cost, quality[m.name], _ttft(m, learned)
        )

    gap = score(first) - score(second)
    if learned is None:
        return 1.0 if gap > 0 else 0.5
    w = quality_weight(weights) if strategy == identity_pb2.ROUTING_STRATEGY_BALANCED else 1.0
    spread = w * math.hypot(
        learned.estimates[first.name].spread, learned.estimates[second.name].spread
    )
    if spread <= 0:
        return 1.0 if gap > 0 else 0.5
    return 0.5 * (1.0 + math.erf(gap / (spread * math.sqrt(2.0))))


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
