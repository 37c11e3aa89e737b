"""The routing decision as a value: the chosen model, its fallbacks and why.

:mod:`services.router.policy` makes it; the engine, the records sent to budget
and cache, and the Route RPC read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from orchestra.common.v1 import identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from services.router import cost, tasks


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which model answers, and what comes after it if it fails.

    Attributes:
        chain: The chosen model first, then the fallbacks, in order.
        reason: Why, for humans.
        strategy: The strategy applied.
        prompt_tokens: The estimated prompt size.
        max_tokens: The resolved output cap.
        excluded: (model name, filter) pairs removed by filters.
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

    def hold_micro_usd(self) -> int:
        """The budget hold: the worst case across the whole fallback chain."""
        return max(self.worst_case_micro_usd(m) for m in self.chain)
