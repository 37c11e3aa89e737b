"""Answering a cache miss: the provider calls down the fallback chain.

Each model of the decision's chain is tried in turn: its circuit breaker is
asked first, the provider is streamed with retries while nothing has been
streamed, and the next model takes over when one fails before its first token.
Once tokens flow, a failure ends the answer (partial, with the usage and cost
of what was produced). :class:`Run` keeps what happened for the accounting
that follows (:mod:`services.router.accounting`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping

from orchestra.common.v1 import chat_pb2, errors_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.errors import OrchestraError, Unavailable, reason_name
from services.providers.base import (
    Finish,
    ProviderAdapter,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    UpstreamRequest,
    UsageReport,
)
from services.router import cost
from services.router.breakers import Breakers, Permit, State, counts_as_failure
from services.router.context import RequestContext

log = logging.getLogger(__name__)

MAX_RETRIES_PER_MODEL = 2
MAX_RETRY_AFTER_SECONDS = 5.0

Spawn = Callable[[Coroutine[object, object, object]], None]


@dataclasses.dataclass
class Run:
    """What has happened so far while answering one request.

    Attributes:
        model: The model that streamed the first token (None: none yet).
        text: The text produced, in pieces.
        tool_calls: The tool calls produced, by index.
        explored_entry_id: The cache entry explored by this request (adaptive
            cache mode), compared with the fresh answer when that is stored.
        usage: The provider's usage report, if it sent one.
        finish: Why the answer ended.
        first_token_ms: Time to the first token.
        fallbacks: The models skipped or failed before the answering one.
        outcome: The error the request ended with (None: success).
    """

    model: discovery_pb2.Model | None = None
    text: list[str] = dataclasses.field(default_factory=list)
    tool_calls: dict[int, chat_pb2.ToolCall] = dataclasses.field(default_factory=dict)
    explored_entry_id: str = ""
    usage: UsageReport | None = None
    finish: chat_pb2.FinishReason.ValueType = chat_pb2.FINISH_REASON_UNSPECIFIED
    first_token_ms: int = 0
    fallbacks: list[chat_api.FallbackAttempt] = dataclasses.field(default_factory=list)
    outcome: OrchestraError | None = None

    @property
    def started(self) -> bool:
        """Whether a model has streamed its first token."""
        return self.model is not None

    def apply(self, event: object) -> chat_api.ChatStreamResponse | None:
        """Folds one provider event in; returns what the client is sent, if any."""
        if isinstance(event, TextDelta):
            self.text.append(event.text)
            return chat_api.ChatStreamResponse(text_delta=chat_api.TextDelta(text=event.text))
        if isinstance(event, ToolCallDelta):
            call = self.tool_calls.setdefault(event.index, chat_pb2.ToolCall())
            call.id = call.id or event.id
            call.name = call.name or event.name
            call.arguments += event.arguments
            return chat_api.ChatStreamResponse(
                tool_call_delta=chat_api.ToolCallDelta(
                    index=event.index, id=event.id, name=event.name, arguments_delta=event.arguments
                )
            )
        if isinstance(event, UsageReport):
            self.usage = event
        elif isinstance(event, Finish):
            self.finish = event.reason
        return None

    def final_usage(self, prompt_tokens_estimate: int) -> chat_pb2.Usage:
        """The provider's usage, or an estimate from what was produced."""
        if self.usage is not None:
            return chat_pb2.Usage(
                prompt_tokens=self.usage.prompt_tokens,
                completion_tokens=self.usage.completion_tokens,
                cached_prompt_tokens=self.usage.cached_prompt_tokens,
            )
        produced = "".join(self.text) + "".join(c.arguments for c in self.tool_calls.values())
        return chat_pb2.Usage(
            prompt_tokens=prompt_tokens_estimate,
            completion_tokens=cost.estimate_text_tokens(produced),
            estimated=True,
        )

    def end(self, ctx: RequestContext) -> chat_api.ChatEnd:
        """The final event: usage, cost (of what was produced) and timings."""
        usage = self.final_usage(ctx.decision.prompt_tokens)
        model = self.model or ctx.decision.model
        return chat_api.ChatEnd(
            finish_reason=self.finish,
            usage=usage,
            cost_micro_usd=cost.cost_micro_usd(usage, model.pricing) if self.started else 0,
            cache_hit=False,
            fallbacks=self.fallbacks,
            time_to_first_token_ms=self.first_token_ms,
            latency_ms=ctx.elapsed_ms(),
        )


class Caller:
    """Calls providers for one request, minding their circuit breakers."""

    def __init__(
        self, adapters: Mapping[str, ProviderAdapter], breakers: Breakers | None, spawn: Spawn
    ) -> None:
        self._adapters = adapters
        self._breakers = breakers
        self._spawn = spawn

    async def permit(self, model: discovery_pb2.Model) -> Permit:
        """Whether ``model``'s breaker lets a call through."""
        if self._breakers is None:
            return Permit(allowed=True)
        return await self._breakers.acquire(model.provider_id, model.model_id)

    async def _record(self, model: discovery_pb2.Model, *, ok: bool) -> State:
        if self._breakers is None:
            return State.CLOSED
        return await self._breakers.record(model.provider_id, model.model_id, ok=ok)

    async def attempt(
        self,
        model: discovery_pb2.Model,
        upstream: UpstreamRequest,
        ctx: RequestContext,
        permit: Permit,
    ) -> AsyncIterator[object]:
        """Streams one model, retrying while nothing has been streamed.

        Each upstream call's outcome goes to the model's circuit breaker; once
        the breaker opens, the model is not retried.
        """
        adapter = self._adapters[model.provider_id]
        for attempt in range(MAX_RETRIES_PER_MODEL + 1):
            streamed = False
            reported = False
            try:
                async for event in adapter.stream(upstream):
                    streamed = True
                    yield event
                reported = True
                if self._breakers is not None:
                    self._spawn(self._record(model, ok=True))
                return
            except UpstreamError as exc:
                reported = counts_as_failure(exc)
                if reported and await self._record(model, ok=False) is State.OPEN:
                    raise
                if streamed or not exc.retryable or attempt == MAX_RETRIES_PER_MODEL:
                    raise
                delay = min(exc.retry_after or 0.2 * 2**attempt, MAX_RETRY_AFTER_SECONDS)
                remaining = ctx.remaining()
                if remaining is not None and delay >= remaining:
                    raise
                await asyncio.sleep(delay)
            finally:
                # A probe that ended without an upstream verdict (the client
                # cancelled, or a 4xx caused by the request) frees its slot.
                if permit.probe and not reported and self._breakers is not None:
                    self._spawn(self._breakers.release(model.provider_id, model.model_id))


async def answer(
    ctx: RequestContext, run: Run, caller: Caller
) -> AsyncIterator[chat_api.ChatStreamResponse]:
    """Streams the answer from the first model of the chain that gives one.

    Raises:
        Unavailable: UPSTREAM_UNAVAILABLE when every model failed before its
            first token; UPSTREAM_STREAM_BROKEN when the answering one failed
            mid-stream (after the final event). Either is kept in ``run``.
    """
    try:
        async for event in _chain(ctx, run, caller):
            yield event
        end = run.end(ctx)
        yield chat_api.ChatStreamResponse(usage=end.usage)
        yield chat_api.ChatStreamResponse(end=end)
    except UpstreamError as exc:
        run.finish = chat_pb2.FINISH_REASON_ERROR
        broken = run.model.name if run.model else ""
        run.outcome = Unavailable(
            errors_pb2.ERROR_REASON_UPSTREAM_STREAM_BROKEN,
            f"{broken} failed mid-stream: {exc}; the answer is partial "
            "(the final event carries the usage and cost of what was produced)",
            metadata={"model": broken},
        )
        yield chat_api.ChatStreamResponse(end=run.end(ctx))
        raise run.outcome from None
    except asyncio.CancelledError:
        run.finish = chat_pb2.FINISH_REASON_CANCELLED
        raise


async def _chain(
    ctx: RequestContext, run: Run, caller: Caller
) -> AsyncIterator[chat_api.ChatStreamResponse]:
    """Tries the chain's models in order until one streams its first token."""
    decision, request = ctx.decision, ctx.request
    generation = chat_pb2.GenerationConfig()
    generation.CopyFrom(request.generation)
    generation.max_tokens = decision.max_tokens
    for model in decision.chain:
        permit = await caller.permit(model)
        if not permit.allowed:
            run.fallbacks.append(_skipped(model, permit))
            continue
        upstream = UpstreamRequest(
            model_id=model.model_id,
            messages=list(request.messages),
            tools=list(request.tools),
            tool_choice=request.tool_choice if request.HasField("tool_choice") else None,
            generation=generation,
            timeout=ctx.remaining(),
        )
        try:
            async for event in caller.attempt(model, upstream, ctx, permit):
                if not run.started:
                    run.model = model
                    run.first_token_ms = ctx.elapsed_ms()
                    yield _start(ctx, model, run.fallbacks)
                out = run.apply(event)
                if out is not None:
                    yield out
            return
        except UpstreamError as exc:
            if run.started:
                raise
            run.fallbacks.append(_fallback(model, exc))
            log.info("%s failed before its first token (%s); trying next", model.name, exc)
    run.outcome = Unavailable(
        errors_pb2.ERROR_REASON_UPSTREAM_UNAVAILABLE,
        "every model in the fallback chain failed before its first token: "
        + "; ".join(f"{f.model}: {f.message}" for f in run.fallbacks),
        metadata={"fallbacks": ",".join(f.model for f in run.fallbacks)},
        retry_after=1.0,
    )
    raise run.outcome


def _start(
    ctx: RequestContext, model: discovery_pb2.Model, fallbacks: list[chat_api.FallbackAttempt]
) -> chat_api.ChatStreamResponse:
    """The first event: which model answers, and why."""
    decision = ctx.decision
    reason = (
        decision.reason
        if model is decision.model
        else _fallback_reason(model, fallbacks) + decision.reason
    )
    return chat_api.ChatStreamResponse(
        start=chat_api.ChatStart(
            request_id=ctx.request_id,
            model=model.name,
            provider=model.provider_id,
            routing_reason=reason,
        )
    )


def _skipped(model: discovery_pb2.Model, permit: Permit) -> chat_api.FallbackAttempt:
    opened = time.strftime("%H:%M:%SZ", time.gmtime(permit.opened_at))
    return chat_api.FallbackAttempt(
        model=model.name,
        reason=reason_name(errors_pb2.ERROR_REASON_CIRCUIT_OPEN),
        message=f"not called: circuit breaker open since {opened} after repeated failures",
    )


def _fallback_reason(model: discovery_pb2.Model, fallbacks: list[chat_api.FallbackAttempt]) -> str:
    skipped = sum(f.reason == "CIRCUIT_OPEN" for f in fallbacks)
    failed = len(fallbacks) - skipped
    why = [f"{failed} failure(s)"] if failed else []
    why += [f"{skipped} open circuit breaker(s)"] if skipped else []
    return f"fallback to {model.name} after {' and '.join(why)}; "


def _fallback(model: discovery_pb2.Model, exc: UpstreamError) -> chat_api.FallbackAttempt:
    reason = (
        errors_pb2.ERROR_REASON_UPSTREAM_MALFORMED
        if exc.kind.value == "malformed"
        else errors_pb2.ERROR_REASON_UPSTREAM_UNAVAILABLE
    )
    return chat_api.FallbackAttempt(model=model.name, reason=reason_name(reason), message=str(exc))
