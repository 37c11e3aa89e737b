"""``orchestra.router.v1.RouterService``: routing, feedback, batches, breakers.

A thin servicer: it checks the caller, decodes the request, calls the engine,
the learner, the batch runner or the breakers, and encodes the answer.
"""

from __future__ import annotations

import math
from typing import Any

import grpc

from orchestra.common.v1 import errors_pb2, identity_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import router_service_pb2 as router_api
from orchestra.router.v1 import router_service_pb2_grpc as router_grpc
from services.common import paging
from services.common.errors import InvalidArgument, NotFound
from services.common.identity import IdentitySigner, caller
from services.common.outages import redis_outage
from services.router import cost, learning, validation
from services.router.batch_runner import BatchRunner
from services.router.breakers import State
from services.router.decision import Decision
from services.router.engine import Engine

Context = grpc.aio.ServicerContext[Any, Any]

MAX_FEEDBACK_COMMENT_CHARS = 2_000

_CIRCUIT_STATES = {
    State.CLOSED: router_api.CIRCUIT_STATE_CLOSED,
    State.OPEN: router_api.CIRCUIT_STATE_OPEN,
    State.HALF_OPEN: router_api.CIRCUIT_STATE_HALF_OPEN,
}


def route_decision(
    decision: Decision, learner: learning.Learner, tenant_id: str
) -> router_api.RouteDecision:
    """The RouteDecision message of ``decision``."""
    model = decision.model
    counts = learner.state(tenant_id).counts.get(model.name)
    task = decision.task
    return router_api.RouteDecision(
        model=model.name,
        provider=model.provider_id,
        reason=decision.reason,
        fallbacks=[m.name for m in decision.chain[1:]],
        estimated_cost_micro_usd=cost.worst_case_micro_usd(
            decision.prompt_tokens, decision.max_tokens, model.pricing
        ),
        estimated_latency_ms=model.health.ttft_p50_ms
        or (int(counts.mean_ttft_ms) if counts else 0),
        confidence=decision.confidence,
        strategy=decision.strategy,
        task_type=task.task_type if task else chat_api.TASK_TYPE_UNSPECIFIED,
        complexity=task.complexity if task else chat_api.COMPLEXITY_UNSPECIFIED,
        excluded=[router_api.ExcludedModel(model=name, filter=f) for name, f in decision.excluded],
        explored=decision.explored,
        expected_quality=decision.expected_quality,
    )


def _check_feedback(request: router_api.SubmitFeedbackRequest) -> None:
    """Raises InvalidArgument for a malformed feedback request."""
    if not validation.is_request_id(request.request_id):  # the ChatRequest.request_id rule
        raise InvalidArgument(
            errors_pb2.ERROR_REASON_INVALID_FIELD,
            "request_id must be the id of an answered chat request "
            "(1-128 characters of [A-Za-z0-9._:-])",
            field="request_id",
        )
    score = request.score
    if not (math.isfinite(score) and 0.0 <= score <= 1.0):
        raise InvalidArgument(
            errors_pb2.ERROR_REASON_FEEDBACK_SCORE_OUT_OF_RANGE,
            f"score must be from 0 (useless) to 1 (perfect), not {score}",
            metadata={"score": str(score)},
            field="score",
        )
    if len(request.comment) > MAX_FEEDBACK_COMMENT_CHARS:
        raise InvalidArgument(
            errors_pb2.ERROR_REASON_INVALID_FIELD,
            f"comment is limited to {MAX_FEEDBACK_COMMENT_CHARS} characters",
            field="comment",
        )


class RouterServicer(router_grpc.RouterServiceServicer):
    """``orchestra.router.v1.RouterService``.

    Feedback and batches arrive with the learned routing policy.
    """

    def __init__(
        self,
        engine: Engine,
        signer: IdentitySigner,
        learner: learning.Learner,
        batches: BatchRunner | None = None,
    ) -> None:
        self._engine = engine
        self._signer = signer
        self._batches = batches
        self._learner = learner

    async def Route(
        self, request: router_api.RouteRequest, context: Context
    ) -> router_api.RouteResponse:
        """See the proto."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_CHAT)
        decision = await self._engine.route(identity, request.chat)
        return router_api.RouteResponse(
            decision=route_decision(decision, self._learner, identity.tenant_id)
        )

    async def SubmitFeedback(
        self, request: router_api.SubmitFeedbackRequest, context: Context
    ) -> router_api.SubmitFeedbackResponse:
        """See the proto: the score becomes the answering model's quality reward."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_CHAT)
        _check_feedback(request)
        rid = request.request_id
        with redis_outage:
            found = await self._learner.feedback(identity.tenant_id, rid, float(request.score))
        if not found:
            raise NotFound(
                errors_pb2.ERROR_REASON_FEEDBACK_REQUEST_UNKNOWN,
                f"no answered request {rid!r} for this tenant in the last 7 days "
                "(cache hits and failed requests take no feedback)",
                metadata={"request_id": rid},
            )
        return router_api.SubmitFeedbackResponse()

    def _batch_runner(self) -> BatchRunner:
        if self._batches is None:
            raise NotImplementedError  # answered as UNIMPLEMENTED
        return self._batches

    async def CreateBatch(
        self, request: router_api.CreateBatchRequest, context: Context
    ) -> router_api.CreateBatchResponse:
        """See the proto."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_CHAT)
        batch = await self._batch_runner().create(identity, request)
        return router_api.CreateBatchResponse(batch=batch)

    async def GetBatch(
        self, request: router_api.GetBatchRequest, context: Context
    ) -> router_api.GetBatchResponse:
        """See the proto."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_CHAT)
        batch = await self._batch_runner().store.get(identity.tenant_id, request.batch_id)
        return router_api.GetBatchResponse(batch=batch)

    async def ListBatchResults(
        self, request: router_api.ListBatchResultsRequest, context: Context
    ) -> router_api.ListBatchResultsResponse:
        """See the proto."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_CHAT)
        return await self._batch_runner().store.results(identity.tenant_id, request)

    async def CancelBatch(
        self, request: router_api.CancelBatchRequest, context: Context
    ) -> router_api.CancelBatchResponse:
        """See the proto."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_CHAT)
        batch = await self._batch_runner().store.cancel(identity.tenant_id, request.batch_id)
        return router_api.CancelBatchResponse(batch=batch)

    async def ListCircuitBreakers(
        self, request: router_api.ListCircuitBreakersRequest, context: Context
    ) -> router_api.ListCircuitBreakersResponse:
        """See the proto."""
        caller(context, self._signer, identity_pb2.SCOPE_READ)
        size = paging.page_size(request.page_size)
        after = paging.decode(request.page_token) or ""
        models = sorted(
            (m for m in self._engine.routable_models() if m.name > after), key=lambda m: m.name
        )
        page = models[:size]
        response = router_api.ListCircuitBreakersResponse()
        if len(models) > size:
            response.next_page_token = paging.encode(page[-1].name)
        breakers = self._engine.breakers
        if breakers is None:
            return response
        statuses = await breakers.status([(m.provider_id, m.model_id) for m in page])
        for model, status in zip(page, statuses, strict=True):
            out = response.breakers.add(
                model=model.name,
                state=_CIRCUIT_STATES[status.state],
                consecutive_failures=status.consecutive_failures,
                window_calls=status.window_calls,
                window_failures=status.window_failures,
                trips=status.trips,
            )
            if status.opened_at:
                out.open_time.FromNanoseconds(int(status.opened_at * 1e9))
        return response
