"""The router's servicers: thin wrappers that check the caller and call the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import chat_service_pb2_grpc as chat_grpc
from orchestra.router.v1 import router_service_pb2 as router_api
from orchestra.router.v1 import router_service_pb2_grpc as router_grpc
from services.common.identity import IdentitySigner, caller
from services.router import cost
from services.router.engine import Engine

Context = grpc.aio.ServicerContext[Any, Any]


def _deadline(context: Context) -> float | None:
    remaining: float | None = context.time_remaining()
    return remaining


class ChatServicer(chat_grpc.ChatServiceServicer):
    """``orchestra.router.v1.ChatService``."""

    def __init__(self, engine: Engine, signer: IdentitySigner) -> None:
        self._engine = engine
        self._signer = signer

    async def ChatStream(  # noqa: N802 - gRPC method name
        self, request: chat_api.ChatRequest, context: Context
    ) -> AsyncIterator[chat_api.ChatStreamResponse]:
        """See the proto."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_CHAT)
        async for event in self._engine.stream(identity, request, _deadline(context)):
            yield event

    async def Chat(  # noqa: N802 - gRPC method name
        self, request: chat_api.ChatRequest, context: Context
    ) -> chat_api.ChatResponse:
        """See the proto: the same flow as ChatStream, folded into one message."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_CHAT)
        response = chat_api.ChatResponse()
        message = chat_pb2.Message(role=chat_pb2.ROLE_ASSISTANT)
        text: list[str] = []
        calls: dict[int, chat_pb2.ToolCall] = {}
        async for event in self._engine.stream(identity, request, _deadline(context)):
            kind = event.WhichOneof("event")
            if kind == "start":
                response.request_id = event.start.request_id
                response.model = event.start.model
                response.provider = event.start.provider
                response.routing_reason = event.start.routing_reason
            elif kind == "text_delta":
                text.append(event.text_delta.text)
            elif kind == "tool_call_delta":
                delta = event.tool_call_delta
                call = calls.setdefault(delta.index, chat_pb2.ToolCall())
                call.id = call.id or delta.id
                call.name = call.name or delta.name
                call.arguments += delta.arguments_delta
            elif kind == "end":
                end = event.end
                response.finish_reason = end.finish_reason
                response.usage.CopyFrom(end.usage)
                response.cost_micro_usd = end.cost_micro_usd
                response.cache_hit = end.cache_hit
                response.fallbacks.extend(end.fallbacks)
                response.latency_ms = end.latency_ms
        if text:
            message.content.append(chat_pb2.ContentPart(text="".join(text)))
        message.tool_calls.extend(calls[i] for i in sorted(calls))
        response.message.CopyFrom(message)
        return response


class RouterServicer(router_grpc.RouterServiceServicer):
    """``orchestra.router.v1.RouterService``.

    Feedback and batches arrive with the learned routing policy.
    """

    def __init__(self, engine: Engine, signer: IdentitySigner) -> None:
        self._engine = engine
        self._signer = signer

    async def Route(  # noqa: N802 - gRPC method name
        self, request: router_api.RouteRequest, context: Context
    ) -> router_api.RouteResponse:
        """See the proto."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_CHAT)
        decision = await self._engine.route(identity, request.chat)
        model = decision.model
        return router_api.RouteResponse(
            decision=router_api.RouteDecision(
                model=model.name,
                provider=model.provider_id,
                reason=decision.reason,
                fallbacks=[m.name for m in decision.chain[1:]],
                estimated_cost_micro_usd=cost.worst_case_micro_usd(
                    decision.prompt_tokens, decision.max_tokens, model.pricing
                ),
                estimated_latency_ms=model.health.ttft_p50_ms,
                strategy=decision.strategy,
                excluded=[
                    router_api.ExcludedModel(model=name, filter=f) for name, f in decision.excluded
                ],
            )
        )

    # Batches and feedback come with the learned routing policy. Until then these
    # raise NotImplementedError, which the interceptor answers as UNIMPLEMENTED.

    async def SubmitFeedback(  # noqa: N802 - gRPC method name
        self, request: router_api.SubmitFeedbackRequest, context: Context
    ) -> router_api.SubmitFeedbackResponse:
        """Not available yet."""
        raise NotImplementedError

    async def CreateBatch(  # noqa: N802 - gRPC method name
        self, request: router_api.CreateBatchRequest, context: Context
    ) -> router_api.CreateBatchResponse:
        """Not available yet."""
        raise NotImplementedError

    async def GetBatch(  # noqa: N802 - gRPC method name
        self, request: router_api.GetBatchRequest, context: Context
    ) -> router_api.GetBatchResponse:
        """Not available yet."""
        raise NotImplementedError

    async def ListBatchResults(  # noqa: N802 - gRPC method name
        self, request: router_api.ListBatchResultsRequest, context: Context
    ) -> router_api.ListBatchResultsResponse:
        """Not available yet."""
        raise NotImplementedError

    async def CancelBatch(  # noqa: N802 - gRPC method name
        self, request: router_api.CancelBatchRequest, context: Context
    ) -> router_api.CancelBatchResponse:
        """Not available yet."""
        raise NotImplementedError
