"""What the router knows about one chat request, worked out once and passed down.

:class:`PromptFeatures` is what the prompt itself says (its text, task
analysis, size and the learned policy's feature vector);
:class:`RequestContext` adds who asks, the tenant's policy, the routing
decision and the deadline. The engine makes one context per chat: the tenant's
policy is read once and the prompt analysed once, however many steps (routing,
cache, provider calls, accounting, learning) need them.
"""

from __future__ import annotations

import dataclasses
import time

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.router import cost, features, learning, tasks
from services.router.decision import Decision


@dataclasses.dataclass(frozen=True)
class PromptFeatures:
    """The prompt's features, computed once per request.

    Attributes:
        text: The text the task analysis and the learned policy read
            (:func:`services.router.tasks.prompt_text`).
        task: The task analysis (the caller's task type kept when given).
        prompt_tokens: The estimated prompt size, tool declarations included.
        wants_images: Whether any message carries an image.
    """

    text: str
    task: tasks.TaskAnalysis
    prompt_tokens: int
    wants_images: bool
    # The learned policy's feature vector, made on first use (an embedding:
    # the one costly feature). Keyed by the learner that made it.
    _vector: list[tuple[learning.Learner, features.Vector]] = dataclasses.field(
        default_factory=list, repr=False, compare=False
    )

    @classmethod
    def of(cls, request: chat_api.ChatRequest) -> PromptFeatures:
        """The features of ``request``'s prompt."""
        text = tasks.prompt_text(request.messages)
        return cls(
            text=text,
            task=tasks.analyze(text, request.routing.task_type),
            prompt_tokens=cost.estimate_prompt_tokens(request.messages, request.tools),
            wants_images=any(
                part.WhichOneof("part") == "image_url"
                for message in request.messages
                for part in message.content
            ),
        )

    def vector(self, learner: learning.Learner) -> features.Vector:
        """The learned policy's features ``x`` of this prompt (computed once)."""
        for owner, x in self._vector:
            if owner is learner:
                return x
        x = learner.featurize(self.text, self.task)
        self._vector.append((learner, x))
        return x


@dataclasses.dataclass(frozen=True)
class RequestContext:
    """One chat request as the router handles it.

    Attributes:
        request_id: The client's request id, or the one the router gave it.
        identity: The verified caller.
        request: The chat request.
        tenant_policy: The caller's tenant policy, read once at the start.
        features: The prompt's features.
        decision: The routing decision.
        deadline: Seconds the client allows from ``started`` (None: none).
        started: When the router began (``time.monotonic()``).
        cacheable: Whether the cache may serve or keep this request at all.
    """

    request_id: str
    identity: identity_pb2.Identity
    request: chat_api.ChatRequest
    tenant_policy: account_pb2.TenantPolicy
    features: PromptFeatures
    decision: Decision
    deadline: float | None
    started: float
    cacheable: bool

    @property
    def tenant_id(self) -> str:
        """The caller's tenant."""
        return self.identity.tenant_id

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - (time.monotonic() - self.started))

    def elapsed_ms(self) -> int:
        """Milliseconds since the router began."""
        return int((time.monotonic() - self.started) * 1000)


def cacheable(request: chat_api.ChatRequest, tenant_policy: account_pb2.TenantPolicy) -> bool:
    """Whether the cache may serve or keep this request at all.

    A forced tool choice is not part of the cache key, so such requests bypass
    the cache rather than risk a text answer stored for a free choice.
    """
    forced_tool = request.HasField("tool_choice") and (
        request.tool_choice.WhichOneof("choice") == "function_name"
        or request.tool_choice.mode == chat_pb2.TOOL_CHOICE_MODE_REQUIRED
    )
    return tenant_policy.cache_enabled and not forced_tool
