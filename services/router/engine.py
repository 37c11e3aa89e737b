"""One chat request, end to end: route, admit, answer (cache or provider), account.

The flow (docs/architecture.md has the picture):

1. validate the request; read the tenant's policy; decide the model chain;
2. concurrently reserve the worst case in budget and look the prompt up in the
   cache;
3. a hit is replayed as a stream and the hold released; a miss streams from the
   chosen provider, retrying and then falling back to the next model while
   nothing has been streamed yet;
4. afterwards settle the real cost (what was produced, when the stream broke or
   the client cancelled), store the answer in the cache when eligible, and
   append the audit record — all through the durable outbox.

The engine yields ``ChatStreamResponse`` events; the unary Chat RPC folds them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import chat_pb2, errors_pb2, identity_pb2
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
from services.router import cost, learning, policy, records, validation
from services.router.breakers import Breakers, Permit, State, counts_as_failure
from services.router.outbox import Outbox
from services.router.peers import Peers

log = logging.getLogger(__name__)

MAX_RETRIES_PER_MODEL = 2
MAX_RETRY_AFTER_SECONDS = 5.0
CACHE_REPLAY_CHUNK_CHARS = 32


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Router settings the engine needs."""

    default_max_tokens: int = 512
    default_model: str = ""
    max_request_bytes: int = 1_048_576
    audit_salt: bytes = b""


@dataclasses.dataclass
class _Answer:
    """What has been produced so far on the answering model."""

    model: discovery_pb2.Model | None = None
    text: list[str] = dataclasses.field(default_factory=list)
    tool_calls: dict[int, chat_pb2.ToolCall] = dataclasses.field(default_factory=dict)
    explored_entry_id: str = ""  # the cache entry explored by this request (adaptive mode)
    usage: UsageReport | None = None
    finish: chat_pb2.FinishReason.ValueType = chat_pb2.FINISH_REASON_UNSPECIFIED
    first_token_ms: int = 0

    @property
    def started(self) -> bool:
        return self.model is not None

    def add_tool_delta(self, delta: ToolCallDelta) -> None:
        call = self.tool_calls.setdefault(delta.index, chat_pb2.ToolCall())
        call.id = call.id or delta.id
        call.name = call.name or delta.name
        call.arguments += delta.arguments

    def final_usage(self, prompt_tokens_estimate: int) -> chat_pb2.Usage:
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


class Engine:
    """Runs chat requests for the ChatService and RouterService servicers."""

    def __init__(
        self,
        config: EngineConfig,
        peers: Peers,
        outbox: Outbox,
        models: Callable[[], Sequence[discovery_pb2.Model]],
        adapters: Mapping[str, ProviderAdapter],
        breakers: Breakers | None = None,
        learner: learning.Learner | None = None,
    ) -> None:
        self._config = config
        self._peers = peers
        self._outbox = outbox
        self._models = models
        self._adapters = adapters
        self.breakers = breakers
        self.learner = learner
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def max_request_bytes(self) -> int:
        """The largest request accepted (batches validate their items with it)."""
        return self._config.max_request_bytes

    def routable_models(self) -> list[discovery_pb2.Model]:
        """Catalog models whose provider the router has an adapter for."""
        return [m for m in self._models() if m.provider_id in self._adapters]

    async def route(
        self, identity: identity_pb2.Identity, request: chat_api.ChatRequest
    ) -> policy.Decision:
        """The routing decision for ``request`` (no side effects)."""
        validation.validate(request, self._config.max_request_bytes)
        tenant_policy = await self._peers.tenant_policy(identity.tenant_id)
        return policy.decide(
            request,
            self.routable_models(),
            tenant_policy,
            default_max_tokens=self._config.default_max_tokens,
            default_model=self._config.default_model,
            learner=self.learner,
            tenant_id=identity.tenant_id,
        )

    async def stream(
        self,
        identity: identity_pb2.Identity,
        request: chat_api.ChatRequest,
        deadline: float | None,
    ) -> AsyncIterator[chat_api.ChatStreamResponse]:
        """Answers ``request`` as a stream of events.

        Args:
            identity: The verified caller.
            request: The chat request.
            deadline: Seconds the client allows (None: no deadline).
        """
        started = time.monotonic()
        rid = validation.request_id(request)
        decision = await self.route(identity, request)
        tenant_policy = await self._peers.tenant_policy(identity.tenant_id)
        use_cache = _cacheable(request, tenant_policy) and request.cache.mode in (
            chat_api.CACHE_MODE_UNSPECIFIED,
            chat_api.CACHE_MODE_NO_STORE,
        )
        hold = max(decision.worst_case_micro_usd(m) for m in decision.chain)
        reserve = records.reserve_request(rid, identity, request, decision, hold)
        lookup = records.lookup_request(identity, request, decision) if use_cache else None
        if lookup is not None and request.cache.exact_only:
            lookup.exact_only = True
        reserved, hit = await asyncio.gather(
            self._peers.reserve(reserve),
            self._peers.lookup(lookup) if lookup else _none(),
            return_exceptions=True,
        )
        if isinstance(hit, BaseException):
            hit = None
        # Adaptive cache mode: a near entry not served this time, to be compared
        # with the fresh answer when that is stored.
        explored = hit.explored_entry_id if hit is not None else ""
        if hit is not None and hit.hit:
            if not isinstance(reserved, BaseException):
                await self._outbox.put(("release", records.release_payload(rid)))
            async for event in self._replay(rid, identity, request, decision, hit, started):
                yield event
            return
        if isinstance(reserved, BaseException):
            raise reserved
        async for event in self._answer(
            rid, identity, request, decision, deadline, started, explored
        ):
            yield event

    async def chat(
        self,
        identity: identity_pb2.Identity,
        request: chat_api.ChatRequest,
        deadline: float | None,
    ) -> chat_api.ChatResponse:
        """Answers ``request`` as one message: :meth:`stream`'s events folded."""
        response = chat_api.ChatResponse()
        message = chat_pb2.Message(role=chat_pb2.ROLE_ASSISTANT)
        text: list[str] = []
        calls: dict[int, chat_pb2.ToolCall] = {}
        async for event in self.stream(identity, request, deadline):
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

    async def _replay(
        self,
        rid: str,
        identity: identity_pb2.Identity,
        request: chat_api.ChatRequest,
        decision: policy.Decision,
        hit: object,
        started: float,
    ) -> AsyncIterator[chat_api.ChatStreamResponse]:
        from orchestra.cache.v1 import cache_service_pb2 as cache_pb2

        assert isinstance(hit, cache_pb2.LookupResponse)
        answer = hit.answer
        kind = cache_pb2.MatchKind.Name(hit.match_kind).removeprefix("MATCH_KIND_").lower()
        reason = f"cache hit ({kind})"
        yield chat_api.ChatStreamResponse(
            start=chat_api.ChatStart(
                request_id=rid, model=answer.model, routing_reason=reason, cache_hit=True
            )
        )
        first_token_ms = int((time.monotonic() - started) * 1000)
        text = answer.text
        for i in range(0, len(text), CACHE_REPLAY_CHUNK_CHARS):
            yield chat_api.ChatStreamResponse(
                text_delta=chat_api.TextDelta(text=text[i : i + CACHE_REPLAY_CHUNK_CHARS])
            )
        usage = chat_pb2.Usage(prompt_tokens=answer.usage.prompt_tokens, completion_tokens=0)
        yield chat_api.ChatStreamResponse(usage=usage)
        latency_ms = int((time.monotonic() - started) * 1000)
        yield chat_api.ChatStreamResponse(
            end=chat_api.ChatEnd(
                finish_reason=answer.finish_reason,
                usage=usage,
                cost_micro_usd=0,
                cache_hit=True,
                time_to_first_token_ms=first_token_ms,
                latency_ms=latency_ms,
            )
        )
        audit_policy = await self._audit_policy(identity.tenant_id)
        await self._outbox.put(
            (
                "audit",
                records.audit_payload(
                    rid,
                    identity,
                    request,
                    self._config.audit_salt,
                    body_mode=audit_policy.audit_body_mode,
                    retention_days=audit_policy.retention_days,
                    tool_calls=list(answer.tool_calls),
                    model=answer.model,
                    provider="",
                    reason=reason,
                    cache_hit=True,
                    usage=usage,
                    cost_micro_usd=0,
                    status_code=0,
                    error_reason="",
                    latency_ms=latency_ms,
                    answer_text=text,
                    fallbacks=[],
                ),
            )
        )

    async def _answer(
        self,
        rid: str,
        identity: identity_pb2.Identity,
        request: chat_api.ChatRequest,
        decision: policy.Decision,
        deadline: float | None,
        started: float,
        explored: str = "",
    ) -> AsyncIterator[chat_api.ChatStreamResponse]:
        answer = _Answer(explored_entry_id=explored)
        fallbacks: list[chat_api.FallbackAttempt] = []
        generation = chat_pb2.GenerationConfig()
        generation.CopyFrom(request.generation)
        generation.max_tokens = decision.max_tokens
        outcome: OrchestraError | None = None
        try:
            for model in decision.chain:
                permit = await self._permit(model)
                if not permit.allowed:
                    fallbacks.append(_skipped(model, permit))
                    continue
                upstream = UpstreamRequest(
                    model_id=model.model_id,
                    messages=list(request.messages),
                    tools=list(request.tools),
                    tool_choice=request.tool_choice if request.HasField("tool_choice") else None,
                    generation=generation,
                    timeout=_remaining(deadline, started),
                )
                try:
                    async for event in self._attempt(model, upstream, deadline, started, permit):
                        if not answer.started:
                            answer.model = model
                            answer.first_token_ms = int((time.monotonic() - started) * 1000)
                            reason = (
                                decision.reason
                                if model is decision.model
                                else _fallback_reason(model, fallbacks) + decision.reason
                            )
                            yield chat_api.ChatStreamResponse(
                                start=chat_api.ChatStart(
                                    request_id=rid,
                                    model=model.name,
                                    provider=model.provider_id,
                                    routing_reason=reason,
                                )
                            )
                        out = self._apply(answer, event)
                        if out is not None:
                            yield out
                    break
                except UpstreamError as exc:
                    if answer.started:
                        raise
                    fallbacks.append(_fallback(model, exc))
                    log.info("%s failed before its first token (%s); trying next", model.name, exc)
            else:
                outcome = Unavailable(
                    errors_pb2.ERROR_REASON_UPSTREAM_UNAVAILABLE,
                    "every model in the fallback chain failed before its first token: "
                    + "; ".join(f"{f.model}: {f.message}" for f in fallbacks),
                    metadata={"fallbacks": ",".join(f.model for f in fallbacks)},
                    retry_after=1.0,
                )
                raise outcome
            end = self._end(answer, decision, fallbacks, started)
            yield chat_api.ChatStreamResponse(usage=end.usage)
            yield chat_api.ChatStreamResponse(end=end)
        except UpstreamError as exc:
            answer.finish = chat_pb2.FINISH_REASON_ERROR
            broken = answer.model.name if answer.model else ""
            outcome = Unavailable(
                errors_pb2.ERROR_REASON_UPSTREAM_STREAM_BROKEN,
                f"{broken} failed mid-stream: {exc}; the answer is partial "
                "(the final event carries the usage and cost of what was produced)",
                metadata={"model": broken},
            )
            yield chat_api.ChatStreamResponse(end=self._end(answer, decision, fallbacks, started))
            raise outcome from None
        except asyncio.CancelledError:
            answer.finish = chat_pb2.FINISH_REASON_CANCELLED
            raise
        finally:
            # Runs on success, failure and cancellation alike; shielded from the
            # cancellation of this request so the accounting always happens.
            task = asyncio.create_task(
                self._account(rid, identity, request, decision, answer, fallbacks, outcome, started)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _attempt(
        self,
        model: discovery_pb2.Model,
        upstream: UpstreamRequest,
        deadline: float | None,
        started: float,
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
                if self.breakers is not None:
                    self._spawn(self._record(model, ok=True))
                return
            except UpstreamError as exc:
                reported = counts_as_failure(exc)
                if reported and await self._record(model, ok=False) is State.OPEN:
                    raise
                if streamed or not exc.retryable or attempt == MAX_RETRIES_PER_MODEL:
                    raise
                delay = min(exc.retry_after or 0.2 * 2**attempt, MAX_RETRY_AFTER_SECONDS)
                remaining = _remaining(deadline, started)
                if remaining is not None and delay >= remaining:
                    raise
                await asyncio.sleep(delay)
            finally:
                # A probe that ended without an upstream verdict (the client
                # cancelled, or a 4xx caused by the request) frees its slot.
                if permit.probe and not reported and self.breakers is not None:
                    self._spawn(self.breakers.release(model.provider_id, model.model_id))

    async def _permit(self, model: discovery_pb2.Model) -> Permit:
        if self.breakers is None:
            return Permit(allowed=True)
        return await self.breakers.acquire(model.provider_id, model.model_id)

    async def _record(self, model: discovery_pb2.Model, *, ok: bool) -> State:
        if self.breakers is None:
            return State.CLOSED
        return await self.breakers.record(model.provider_id, model.model_id, ok=ok)

    def _spawn(self, work: Coroutine[object, object, object]) -> None:
        """Runs ``work`` off the request's path; :meth:`aclose` waits for it."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _apply(self, answer: _Answer, event: object) -> chat_api.ChatStreamResponse | None:
        if isinstance(event, TextDelta):
            answer.text.append(event.text)
            return chat_api.ChatStreamResponse(text_delta=chat_api.TextDelta(text=event.text))
        if isinstance(event, ToolCallDelta):
            answer.add_tool_delta(event)
            return chat_api.ChatStreamResponse(
                tool_call_delta=chat_api.ToolCallDelta(
                    index=event.index,
                    id=event.id,
                    name=event.name,
                    arguments_delta=event.arguments,
                )
            )
        if isinstance(event, UsageReport):
            answer.usage = event
        elif isinstance(event, Finish):
            answer.finish = event.reason
        return None

    def _end(
        self,
        answer: _Answer,
        decision: policy.Decision,
        fallbacks: list[chat_api.FallbackAttempt],
        started: float,
    ) -> chat_api.ChatEnd:
        usage = answer.final_usage(decision.prompt_tokens)
        model = answer.model or decision.model
        return chat_api.ChatEnd(
            finish_reason=answer.finish,
            usage=usage,
            cost_micro_usd=cost.cost_micro_usd(usage, model.pricing) if answer.started else 0,
            cache_hit=False,
            fallbacks=fallbacks,
            time_to_first_token_ms=answer.first_token_ms,
            latency_ms=int((time.monotonic() - started) * 1000),
        )

    async def _audit_policy(self, tenant_id: str) -> account_pb2.TenantPolicy:
        """The policy deciding how the audit record keeps bodies.

        Cached by peers (the request already read it). If budget cannot be
        reached now, the default policy (salted digests only) keeps the record
        from being lost and never stores more than the tenant allowed.
        """
        try:
            return await self._peers.tenant_policy(tenant_id)
        except OrchestraError as exc:
            log.warning("tenant policy unavailable for the audit record: %s", exc.message)
            return account_pb2.TenantPolicy()

    async def _account(
        self,
        rid: str,
        identity: identity_pb2.Identity,
        request: chat_api.ChatRequest,
        decision: policy.Decision,
        answer: _Answer,
        fallbacks: list[chat_api.FallbackAttempt],
        outcome: OrchestraError | None,
        started: float,
    ) -> None:
        """Settles, stores and audits one answered (or failed) request."""
        end = self._end(answer, decision, fallbacks, started)
        jobs: list[tuple[str, bytes]] = []
        if answer.started:
            jobs.append(
                (
                    "settle",
                    records.settle_payload(
                        rid,
                        end.cost_micro_usd,
                        end.usage,
                        partial=answer.finish
                        in (chat_pb2.FINISH_REASON_ERROR, chat_pb2.FINISH_REASON_CANCELLED),
                    ),
                )
            )
        else:
            jobs.append(("release", records.release_payload(rid)))
        store_allowed = request.cache.mode in (
            chat_api.CACHE_MODE_UNSPECIFIED,
            chat_api.CACHE_MODE_REFRESH,
        )
        if answer.model is not None and outcome is None and store_allowed:
            tenant_policy = await self._peers.tenant_policy(identity.tenant_id)
            if _cacheable(request, tenant_policy) and answer.finish in (
                chat_pb2.FINISH_REASON_STOP,
                chat_pb2.FINISH_REASON_LENGTH,
            ):
                jobs.append(
                    (
                        "cache_store",
                        records.store_payload(
                            rid,
                            identity,
                            request,
                            decision,
                            answer.model.name,
                            "".join(answer.text),
                            list(answer.tool_calls.values()),
                            answer.finish,
                            end.usage,
                            end.cost_micro_usd,
                            ttl_seconds=request.cache.ttl_seconds
                            or tenant_policy.cache_ttl_seconds,
                            explored_entry_id=answer.explored_entry_id,
                        ),
                    )
                )
        status_code = (
            outcome.code.value[0]
            if outcome
            else (1 if answer.finish == chat_pb2.FINISH_REASON_CANCELLED else 0)
        )
        audit_policy = await self._audit_policy(identity.tenant_id)
        jobs.append(
            (
                "audit",
                records.audit_payload(
                    rid,
                    identity,
                    request,
                    self._config.audit_salt,
                    body_mode=audit_policy.audit_body_mode,
                    retention_days=audit_policy.retention_days,
                    tool_calls=list(answer.tool_calls.values()),
                    model=answer.model.name if answer.model else decision.model.name,
                    provider=answer.model.provider_id if answer.model else "",
                    reason=decision.reason,
                    cache_hit=False,
                    usage=end.usage,
                    cost_micro_usd=end.cost_micro_usd,
                    status_code=status_code,
                    error_reason=reason_name(outcome.reason) if outcome else "",
                    latency_ms=end.latency_ms,
                    answer_text="".join(answer.text),
                    fallbacks=[f.model for f in fallbacks],
                ),
            )
        )
        await self._outbox.put(*jobs)
        if self.learner is None:
            return
        learned = answer.model or decision.model
        await learning.record_outcome(  # best effort: never raises
            self.learner,
            identity.tenant_id,
            rid,
            request,
            learned.name,
            learned.quality,
            ok=outcome is None and answer.started,
            cancelled=answer.finish == chat_pb2.FINISH_REASON_CANCELLED,
            ttft_ms=answer.first_token_ms,
            cost_micro_usd=end.cost_micro_usd,
        )

    async def aclose(self) -> None:
        """Waits for in-flight accounting to reach the outbox."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _cacheable(request: chat_api.ChatRequest, tenant_policy: account_pb2.TenantPolicy) -> bool:
    """Whether the cache may serve or keep this request at all.

    A forced tool choice is not part of the cache key, so such requests bypass
    the cache rather than risk a text answer stored for a free choice.
    """
    forced_tool = request.HasField("tool_choice") and (
        request.tool_choice.WhichOneof("choice") == "function_name"
        or request.tool_choice.mode == chat_pb2.TOOL_CHOICE_MODE_REQUIRED
    )
    return tenant_policy.cache_enabled and not forced_tool


async def _none() -> None:
    return None


def _remaining(deadline: float | None, started: float) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - (time.monotonic() - started))


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
