"""One chat request, end to end: route, admit, answer (cache or provider), account.

The flow (docs/architecture.md has the picture):

1. validate the request; read the tenant's policy and analyse the prompt once,
   into a :class:`~services.router.context.RequestContext`; decide the model
   chain (:mod:`services.router.policy`);
2. concurrently reserve the worst case in budget and look the prompt up in the
   cache (:mod:`services.router.cache_step`);
3. a hit is replayed as a stream, then its hold released and its record
   audited in one outbox write, off the client's path; a miss streams from the
   chosen provider, retrying and then falling back to the next model while
   nothing has been streamed yet (:mod:`services.router.answering`); text
   deltas that pile up while the client's stream is busy go out as one
   (:mod:`services.router.coalesce`);
4. afterwards settle the real cost (what was produced, when the stream broke or
   the client cancelled), store the answer in the cache when eligible, and
   append the audit record — all through the durable outbox
   (:mod:`services.router.accounting`). While a miss is answered, the
   replica's journal holds the budget job that would close it if the replica
   died (:mod:`services.router.journal`).

The engine yields ``ChatStreamResponse`` events; the unary Chat RPC folds them.
It raises :mod:`services.common.errors` exceptions, which the servers'
interceptor turns into gRPC statuses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any

from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.providers.base import ProviderAdapter
from services.router import answering, cache_step, context, learning, policy, records, validation
from services.router.accounting import Accountant, closing_job
from services.router.breakers import Breakers
from services.router.coalesce import coalesced
from services.router.config import EngineConfig
from services.router.context import PromptFeatures, RequestContext
from services.router.journal import PROGRESS_SECONDS, Journal
from services.router.outbox import Outbox
from services.router.peers import Peers

__all__ = ["Engine", "EngineConfig"]


class Engine:
    """Runs chat requests for the ChatService and RouterService servicers.

    Attributes:
        breakers: The providers' circuit breakers (None: no breaking).
        learner: The learned routing policy (None: catalog qualities only).
    """

    def __init__(
        self,
        config: EngineConfig,
        peers: Peers,
        outbox: Outbox,
        models: Callable[[], Sequence[discovery_pb2.Model]],
        adapters: Mapping[str, ProviderAdapter],
        breakers: Breakers | None = None,
        learner: learning.Learner | None = None,
        journal: Journal | None = None,
    ) -> None:
        self._config = config
        self._peers = peers
        self._outbox = outbox
        self._models = models
        self._adapters = adapters
        self._accountant = Accountant(outbox, config.internal_key)
        self.breakers = breakers
        self.learner = learner
        self._journal = journal
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def max_request_bytes(self) -> int:
        """The largest request accepted (batches validate their items with it)."""
        return self._config.max_request_bytes

    def routable_models(self) -> list[discovery_pb2.Model]:
        """Catalog models whose provider the router has an adapter for."""
        return [m for m in self._models() if m.provider_id in self._adapters]

    async def prepare(
        self,
        identity: identity_pb2.Identity,
        request: chat_api.ChatRequest,
        deadline: float | None = None,
    ) -> RequestContext:
        """Validates ``request``, reads the tenant's policy and routes it (no side effects).

        Args:
            identity: The verified caller.
            request: The chat request.
            deadline: Seconds the client allows (None: no deadline).

        Raises:
            OrchestraError: The request is invalid, the tenant's policy cannot
                be read, or no model may answer (see :func:`policy.decide`).
        """
        started = time.monotonic()
        rid = validation.request_id(request)
        validation.validate(request, self._config.max_request_bytes)
        tenant_policy = await self._peers.tenant_policy(identity.tenant_id)
        features = PromptFeatures.of(request)
        decision = policy.decide(
            request,
            self.routable_models(),
            tenant_policy,
            default_max_tokens=self._config.default_max_tokens,
            default_model=self._config.default_model,
            learner=self.learner,
            tenant_id=identity.tenant_id,
            features=features,
        )
        return RequestContext(
            request_id=rid,
            identity=identity,
            request=request,
            tenant_policy=tenant_policy,
            features=features,
            decision=decision,
            deadline=deadline,
            started=started,
            cacheable=context.cacheable(request, tenant_policy),
        )

    async def route(
        self, identity: identity_pb2.Identity, request: chat_api.ChatRequest
    ) -> policy.Decision:
        """The routing decision for ``request`` (no side effects)."""
        return (await self.prepare(identity, request)).decision

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
        ctx = await self.prepare(identity, request, deadline)
        decision = ctx.decision
        reserve = records.reserve_request(
            ctx.request_id, identity, request, decision, decision.hold_micro_usd()
        )
        lookup = cache_step.lookup_request(ctx)
        reserved, hit = await asyncio.gather(
            self._peers.reserve(reserve),
            self._peers.lookup(lookup) if lookup else _none(),
            return_exceptions=True,
        )
        if isinstance(hit, BaseException):
            hit = None
        if hit is not None and hit.hit:
            played = cache_step.replayed(hit)
            try:
                async for event in cache_step.replay(ctx, played):
                    yield event
            finally:
                # After the replay (or the client's cancellation), off its path.
                held = not isinstance(reserved, BaseException)
                self._spawn(self._accountant.account_hit(ctx, played, held=held))
            return
        if isinstance(reserved, BaseException):
            raise reserved
        # Adaptive cache mode: a near entry not served this time, to be compared
        # with the fresh answer when that is stored.
        explored = hit.explored_entry_id if hit is not None else ""
        run = answering.Run(explored_entry_id=explored)
        answer = coalesced(self._answer(ctx, run))
        journal = self._journal
        if journal is None:
            async for event in answer:
                yield event
            return
        journal.opened(ctx.request_id, ("release", records.release_payload(ctx.request_id)))
        loop, progress_at = asyncio.get_running_loop(), 0.0
        async for event in answer:
            # Once text is on its way to the client, a dying replica's chat
            # is settled on what was produced; renewed every few seconds.
            if run.started and (now := loop.time()) >= progress_at:
                journal.opened(ctx.request_id, closing_job(ctx, run))
                progress_at = now + PROGRESS_SECONDS
            yield event

    async def chat(
        self,
        identity: identity_pb2.Identity,
        request: chat_api.ChatRequest,
        deadline: float | None,
    ) -> chat_api.ChatResponse:
        """Answers ``request`` as one message: :meth:`stream`'s events folded."""
        response = chat_api.ChatResponse()
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
                _fold_end(response, event.end)
        message = chat_pb2.Message(role=chat_pb2.ROLE_ASSISTANT)
        if text:
            message.content.append(chat_pb2.ContentPart(text="".join(text)))
        message.tool_calls.extend(calls[i] for i in sorted(calls))
        response.message.CopyFrom(message)
        return response

    async def _answer(
        self, ctx: RequestContext, run: answering.Run
    ) -> AsyncGenerator[chat_api.ChatStreamResponse, None]:
        caller = answering.Caller(self._adapters, self.breakers, self._spawn)
        try:
            async for event in answering.answer(ctx, run, caller):
                yield event
        finally:
            # Runs on success, failure and cancellation alike; a task of its
            # own, so the cancellation of this request does not stop it.
            self._spawn(self._account(ctx, run))

    async def _account(self, ctx: RequestContext, run: answering.Run) -> None:
        await self._accountant.account(ctx, run, self.learner)
        if self._journal is not None:
            self._journal.ended(ctx.request_id)  # its own settlement is in the outbox

    def _spawn(self, work: Coroutine[object, object, object]) -> None:
        """Runs ``work`` off the request's path; :meth:`aclose` waits for it."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Waits for in-flight accounting to reach the outbox."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _fold_end(response: chat_api.ChatResponse, end: chat_api.ChatEnd) -> None:
    response.finish_reason = end.finish_reason
    response.usage.CopyFrom(end.usage)
    response.cost_micro_usd = end.cost_micro_usd
    response.cache_hit = end.cache_hit
    response.fallbacks.extend(end.fallbacks)
    response.latency_ms = end.latency_ms


async def _none() -> None:
    return None
