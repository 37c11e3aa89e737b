"""The routing policy's ranking: how candidates are scored under a strategy.

A score per candidate (cost, latency, quality, or the balanced mix of the
three), the learned policy's per-prompt estimates that feed it
(:mod:`services.router.learning`), the time-to-first-token estimate, and the
confidence that the first choice beats the runner-up. Pure: the learner's
in-memory snapshot is its only state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from services.router import bandit, learning
from services.router.context import PromptFeatures

UNKNOWN_LATENCY_MS = 5_000


def quality_weight(weights: account_pb2.BalancedWeights) -> float:
    """The balanced strategy's weight of quality (1 when unset)."""
    return weights.quality or 1.0


def score(
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
    latency = ttft_ms or UNKNOWN_LATENCY_MS
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
    speed = 1.0 - min(latency, UNKNOWN_LATENCY_MS) / UNKNOWN_LATENCY_MS
    return quality_weight(weights) * quality + w_cost * cheapness + w_latency * speed


@dataclasses.dataclass(frozen=True)
class Learned:
    """The learned policy's view of the candidates for one prompt.

    Attributes:
        estimates: Per model name, the learned estimate at this prompt.
        sampled: Per model name, a posterior draw of the quality when the
            decision explores; None otherwise.
    """

    estimates: Mapping[str, bandit.Estimate]
    sampled: Mapping[str, float] | None


def learned(
    strategy: identity_pb2.RoutingStrategy.ValueType,
    candidates: Sequence[discovery_pb2.Model],
    features: PromptFeatures,
    policy: account_pb2.TenantPolicy,
    tenant_id: str,
    learner: learning.Learner | None,
) -> Learned | None:
    """The learned estimates (and, when exploring, a posterior sample) or None."""
    if strategy not in (
        identity_pb2.ROUTING_STRATEGY_BALANCED,
        identity_pb2.ROUTING_STRATEGY_QUALITY,
    ):
        return None
    if learner is None or not tenant_id or len(candidates) < 2:
        return None
    x = features.vector(learner)
    estimates = learner.estimates(tenant_id, x, [(m.name, m.quality) for m in candidates])
    sampled = None
    if strategy == identity_pb2.ROUTING_STRATEGY_BALANCED and learner.may_explore(
        tenant_id, policy.max_exploration_rate
    ):
        sampled = {n: e.expected_quality(learner.sample(e)) for n, e in estimates.items()}
    return Learned(estimates, sampled)


def ttft(model: discovery_pb2.Model, learned: Learned | None) -> float:
    """Probed time to first token, else the observed mean, else 0 (unknown)."""
    if model.health.ttft_p50_ms:
        return float(model.health.ttft_p50_ms)
    if learned is not None and model.name in learned.estimates:
        return learned.estimates[model.name].mean_ttft_ms
    return 0.0


@dataclasses.dataclass(frozen=True)
class Scorer:
    """Scores and ranks candidates under one strategy for one request.

    Attributes:
        strategy: The strategy applied.
        weights: The tenant's balanced weights.
        costs: Worst-case cost per model name.
        top_cost: The highest worst case among the eligible (normalises cost).
        learned: The learned estimates, or None.
        default_model: The operator's default, which wins ties.
    """

    strategy: identity_pb2.RoutingStrategy.ValueType
    weights: account_pb2.BalancedWeights
    costs: Mapping[str, int]
    top_cost: int
    learned: Learned | None
    default_model: str = ""

    def ttft(self, model: discovery_pb2.Model) -> float:
        """``model``'s time-to-first-token estimate (0: unknown)."""
        return ttft(model, self.learned)

    def score(self, model: discovery_pb2.Model, quality: Mapping[str, float]) -> float:
        """``model``'s score with ``quality`` as the per-model quality."""
        return score(
            model,
            self.strategy,
            self.weights,
            self.costs[model.name],
            self.top_cost,
            quality[model.name],
            self.ttft(model),
        )

    def rank(
        self, candidates: Sequence[discovery_pb2.Model], quality: Mapping[str, float]
    ) -> list[discovery_pb2.Model]:
        """``candidates``, best first (the default model, then name, break ties)."""
        return sorted(
            candidates,
            key=lambda m: (m.name != self.default_model, -self.score(m, quality), m.name),
        )

    def confidence(
        self, ranked: Sequence[discovery_pb2.Model], quality: Mapping[str, float]
    ) -> float:
        """P(first choice beats the runner-up) under the quality posterior.

        Without learned estimates (cost, latency, or nothing learned yet), 1 for
        a strict winner and 0.5 for a tie.
        """
        if len(ranked) < 2:
            return 1.0
        first, second = ranked[0], ranked[1]
        gap = self.score(first, quality) - self.score(second, quality)
        if self.learned is None:
            return 1.0 if gap > 0 else 0.5
        balanced = self.strategy == identity_pb2.ROUTING_STRATEGY_BALANCED
        w = quality_weight(self.weights) if balanced else 1.0
        estimates = self.learned.estimates
        spread = w * math.hypot(estimates[first.name].spread, estimates[second.name].spread)
        if spread <= 0:
            return 1.0 if gap > 0 else 0.5
        return 0.5 * (1.0 + math.erf(gap / (spread * math.sqrt(2.0))))
