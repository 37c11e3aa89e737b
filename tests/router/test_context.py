"""The request context: the prompt's features, worked out once (pure)."""

from __future__ import annotations

import numpy as np

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.router import bandit, cost, features, learning, policy, tasks
from services.router.context import PromptFeatures, cacheable


class _CountingFeaturizer(features.Featurizer):
    """Zero features, counting the calls (no embedding model loaded)."""

    def __init__(self) -> None:  # no super().__init__: it would load the embedder
        self.calls = 0

    def __call__(self, text: str, analysis: tasks.TaskAnalysis) -> features.Vector:
        self.calls += 1
        return np.zeros(features.FEATURE_DIM)


def _request(*parts: chat_pb2.ContentPart) -> chat_api.ChatRequest:
    return chat_api.ChatRequest(messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=parts)])


def test_features_are_those_the_policy_computed_before() -> None:
    request = _request(chat_pb2.ContentPart(text="What is 12 times 7?"))
    request.routing.task_type = chat_api.TASK_TYPE_MATH
    prompt = PromptFeatures.of(request)
    assert prompt.text == tasks.prompt_text(request.messages)
    assert prompt.task == tasks.analyze(prompt.text, chat_api.TASK_TYPE_MATH)
    assert prompt.prompt_tokens == cost.estimate_prompt_tokens(request.messages, request.tools)
    assert not prompt.wants_images
    image = chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl(url="https://x/y.png"))
    assert PromptFeatures.of(_request(chat_pb2.ContentPart(text="this?"), image)).wants_images


def test_the_feature_vector_is_computed_once_per_learner() -> None:
    prompt = PromptFeatures.of(_request(chat_pb2.ContentPart(text="Hi")))
    featurizer = _CountingFeaturizer()
    learner = learning.Learner(None, featurizer)
    first = prompt.vector(learner)
    assert prompt.vector(learner) is first
    assert featurizer.calls == 1
    other = _CountingFeaturizer()
    prompt.vector(learning.Learner(None, other))
    assert other.calls == 1


def test_a_forced_tool_choice_bypasses_the_cache() -> None:
    request = _request(chat_pb2.ContentPart(text="Hi"))
    enabled = account_pb2.TenantPolicy(cache_enabled=True)
    assert cacheable(request, enabled)
    assert not cacheable(request, account_pb2.TenantPolicy())
    request.tool_choice.mode = chat_pb2.TOOL_CHOICE_MODE_REQUIRED
    assert not cacheable(request, enabled)


def test_max_latency_uses_the_learned_time_to_first_token() -> None:
    """Unprobed models are judged by the mean time to first token observed."""
    models = [
        discovery_pb2.Model(
            name=f"p/{name}",
            provider_id="p",
            model_id=name,
            quality=quality,
            price_source=discovery_pb2.PRICE_SOURCE_CATALOG,
            pricing=discovery_pb2.Pricing(input_micro_usd_per_mtok=1, output_micro_usd_per_mtok=1),
        )
        for name, quality in (("good", 0.9), ("quick", 0.5))
    ]
    learner = learning.Learner(None, _CountingFeaturizer(), seed=0)
    counts = learner.state("acme").counts
    counts["p/good"] = bandit.ArmCounts(calls=2, ok=2, ttft_ms=6_000)  # 3 s each
    counts["p/quick"] = bandit.ArmCounts(calls=2, ok=2, ttft_ms=200)
    tenant = account_pb2.TenantPolicy(
        routing_strategy=identity_pb2.ROUTING_STRATEGY_QUALITY, max_exploration_rate=1e-9
    )
    request = _request(chat_pb2.ContentPart(text="Hi"))

    def chosen() -> str:
        decision = policy.decide(
            request, models, tenant, default_max_tokens=16, tenant_id="acme", learner=learner
        )
        return decision.model.name

    assert chosen() == "p/good"
    request.routing.max_latency_ms = 1_000
    assert chosen() == "p/quick"
