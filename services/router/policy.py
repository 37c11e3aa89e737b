"""The routing decision: filters first, then the strategy's ranking.

Input is the request, the catalog (from discovery) and the tenant's policy;
output is a :class:`~services.router.decision.Decision` with the chosen model,
the fallback chain, a reason a human can read, the task analysis and a
confidence. The filters live in :mod:`services.router.filters`, the scoring in
:mod:`services.router.scoring`. This module does no I/O and imports no grpc;
its one stateful input is the learned policy (:mod:`services.router.learning`),
whose in-memory snapshot gives the ``balanced`` and ``quality`` strategies a
per-prompt quality estimate in place of the catalog's single number (with
nothing learned yet, the two agree), and lets ``balanced`` explore within the
tenant's bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import errors_pb2, identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2
from services.common.errors import PermissionDenied
from services.router import cost, filters, learning, scoring
from services.router.context import PromptFeatures
from services.router.decision import Decision
from services.router.filters import resolve_pinned
from services.router.scoring import quality_weight

__all__ = ["MAX_FALLBACKS", "Decision", "decide", "quality_weight", "resolve_pinned"]

MAX_FALLBACKS = 3

_STRATEGY_NAMES = {
    identity_pb2.ROUTING_STRATEGY_COST: "cost",
    identity_pb2.ROUTING_STRATEGY_LATENCY: "latency",
    identity_pb2.ROUTING_STRATEGY_QUALITY: "quality",
    identity_pb2.ROUTING_STRATEGY_BALANCED: "balanced",
}


@dataclasses.dataclass(frozen=True)
class _Ask:
    """What the request asks of the decision, resolved against the policy."""

    request: chat_service_pb2.ChatRequest
    policy: account_pb2.TenantPolicy
    features: PromptFeatures
    strategy: identity_pb2.RoutingStrategy.ValueType
    max_tokens: int

    @property
    def needed_tokens(self) -> int:
        return self.features.prompt_tokens + self.max_tokens

    def decision(
        self, chain: Sequence[discovery_pb2.Model], reason: str, excluded: list[tuple[str, str]]
    ) -> Decision:
        return Decision(
            chain,
            reason,
            self.strategy,
            self.features.prompt_tokens,
            self.max_tokens,
            excluded,
            self.features.task,
            expected_quality=chain[0].quality,
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
    features: PromptFeatures | None = None,
) -> Decision:
    """Chooses the model for ``request``.

    Args:
        request: The chat request.
        models: The catalog.
        policy: The tenant's policy.
        default_max_tokens: The output cap when the request sets none.
        default_model: The operator's default, which wins ties.
        tenant_id: Whose learned state to use (empty: no learning).
        learner: The learned policy (None: the catalog's qualities only).
        features: The prompt's features, when the caller has them already
            (default: computed from ``request``).

    Raises:
        NotFound: MODEL_NOT_FOUND for a pinned model that does not exist.
        PermissionDenied: MODEL_NOT_ALLOWED for a pinned model the policy forbids.
        FailedPrecondition: NO_ELIGIBLE_MODEL or MAX_COST_EXCEEDED.
        InvalidArgument: CONTEXT_TOO_LONG for a pinned model's window.
    """
    gen = request.generation
    ask = _Ask(
        request,
        policy,
        features or PromptFeatures.of(request),
        request.routing.strategy
        or policy.routing_strategy
        or identity_pb2.ROUTING_STRATEGY_BALANCED,
        gen.max_tokens if gen.HasField("max_tokens") else default_max_tokens,
    )
    if request.model:
        return _pinned(ask, models)
    return _ranked(ask, models, default_model, tenant_id, learner)


def _pinned(ask: _Ask, models: Sequence[discovery_pb2.Model]) -> Decision:
    """The decision for a request that names its model (and maybe fallbacks)."""
    model = resolve_pinned(ask.request.model, models)
    needed = ask.needed_tokens
    failed = filters.hard_filter(model, ask.request, ask.policy, needed, ask.features)
    if failed == "allowed_models":
        raise PermissionDenied(
            errors_pb2.ERROR_REASON_MODEL_NOT_ALLOWED,
            f"the tenant's policy does not allow {model.name}",
            metadata={"model": model.name},
        )
    if failed == "context_window":
        raise filters.context_too_long(model, needed)
    if failed is not None:
        raise filters.no_model(f"pinned model {model.name} fails the {failed} filter", failed)
    fallbacks = [resolve_pinned(n, models) for n in ask.request.routing.fallback_models]
    reason = f"pinned to {model.name} by the request ({ask.features.task.describe()})"
    decision = ask.decision([model, *fallbacks], reason, [])
    filters.check_max_cost(decision, ask.request.routing.max_cost_micro_usd)
    return decision


def _ranked(
    ask: _Ask,
    models: Sequence[discovery_pb2.Model],
    default_model: str,
    tenant_id: str,
    learner: learning.Learner | None,
) -> Decision:
    """The strategy's choice among the models that pass the filters."""
    found = filters.eligible(models, ask.request, ask.policy, ask.needed_tokens, ask.features)
    prompt_tokens = ask.features.prompt_tokens
    costs = {
        m.name: cost.worst_case_micro_usd(prompt_tokens, ask.max_tokens, m.pricing)
        for m in found.models
    }
    candidates = filters.affordable(found.models, costs, ask.request.routing.max_cost_micro_usd)
    learned = scoring.learned(
        ask.strategy, candidates, ask.features, ask.policy, tenant_id, learner
    )
    scorer = scoring.Scorer(
        ask.strategy,
        ask.policy.balanced_weights,
        costs,
        max(costs.values()) or 1,
        learned,
        default_model,
    )
    candidates, slow = filters.fast_enough(
        candidates, scorer.ttft, ask.request.routing.max_latency_ms
    )
    greedy: Mapping[str, float] = {m.name: m.quality for m in candidates}
    if learned is not None:
        greedy = {name: e.expected_quality() for name, e in learned.estimates.items()}
    ranked = scorer.rank(candidates, greedy)
    explored = False
    if learned is not None and learned.sampled is not None:
        ranked_sampled = scorer.rank(candidates, learned.sampled)
        explored = ranked_sampled[0].name != ranked[0].name
        ranked = ranked_sampled
    confidence = scorer.confidence(ranked, greedy)
    reason = _reason(ask, ranked[0], greedy, learned, costs, confidence) + (
        f" from {len(candidates)} eligible of {len(models)} models"
        + ("; exploring" if explored else "")
        + (
            "; every fitting model is marked unhealthy, so trying them anyway"
            if found.panic
            else ""
        )
    )
    return dataclasses.replace(
        ask.decision(ranked[: 1 + MAX_FALLBACKS], reason, found.excluded + slow),
        confidence=confidence,
        explored=explored,
        expected_quality=min(max(greedy[ranked[0].name], 0.0), 1.0),
    )


def _reason(
    ask: _Ask,
    chosen: discovery_pb2.Model,
    greedy: Mapping[str, float],
    learned: scoring.Learned | None,
    costs: Mapping[str, int],
    confidence: float,
) -> str:
    """Why ``chosen`` won, for humans (the counts are appended by the caller)."""
    if learned is not None:
        estimate = learned.estimates[chosen.name]
        about = (
            f"learned quality {greedy[chosen.name]:.2f}±{estimate.spread:.2f} "
            f"from {estimate.observations:.0f} rated answers"
        )
    else:
        about = f"quality {chosen.quality:.2f}"
    return (
        f"{_STRATEGY_NAMES.get(ask.strategy, 'balanced')} strategy chose {chosen.name} "
        f"for a {ask.features.task.describe()} ({about}, worst case {costs[chosen.name]} "
        f"micro-USD, confidence {confidence:.2f})"
    )
