"""What follows a chat: settle or release the hold, store the answer, audit, learn.

The jobs go to the durable outbox (:mod:`services.router.outbox`), off the
client's path but never lost; the learned policy's outcome is best effort.
Everything the jobs need comes from the request's
:class:`~services.router.context.RequestContext` (the tenant's policy read at
the start, the prompt's features) and the :class:`~services.router.answering.Run`.
"""

from __future__ import annotations

import logging
from typing import Any

from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.body_transit import BodyTransit
from services.common.errors import reason_name
from services.router import learning, records
from services.router.answering import Run
from services.router.cache_step import Replayed
from services.router.context import RequestContext
from services.router.outbox import Outbox

log = logging.getLogger(__name__)

# The status number recorded for a request the client cancelled (gRPC's CANCELLED).
_CANCELLED = 1
_PARTIAL = (chat_pb2.FINISH_REASON_ERROR, chat_pb2.FINISH_REASON_CANCELLED)
_STORABLE = (chat_pb2.FINISH_REASON_STOP, chat_pb2.FINISH_REASON_LENGTH)
_STORE_MODES = (chat_api.CACHE_MODE_UNSPECIFIED, chat_api.CACHE_MODE_REFRESH)


class Accountant:
    """Hands each request's follow-up work to the outbox."""

    def __init__(self, outbox: Outbox, internal_key: bytes) -> None:
        """``internal_key`` salts the audit digests and seals ENCRYPTED bodies."""
        self._outbox = outbox
        self._salt = internal_key
        self._transit = BodyTransit(internal_key)

    async def account(
        self, ctx: RequestContext, run: Run, learner: learning.Learner | None
    ) -> None:
        """Settles, stores and audits one answered (or failed) request."""
        end = run.end(ctx)
        jobs = [_budget_job(ctx, run, end)]
        store = _store_job(ctx, run, end)
        if store is not None:
            jobs.append(store)
        jobs.append(("audit", self._audit(ctx, run, end)))
        if learner is not None and learner.shared:
            # The learner's counts ride on the jobs' round trip to Redis.
            await self._outbox.put(
                *jobs, also=lambda pipe: _learn_into(pipe, learner, ctx, run, end)
            )
            return
        await self._outbox.put(*jobs)
        if learner is not None:
            await _learn(learner, ctx, run, end)

    async def account_hit(self, ctx: RequestContext, played: Replayed, *, held: bool) -> None:
        """Releases the hold (if one was granted) and audits a request answered
        from the cache, in one outbox write.

        Args:
            ctx: The request.
            played: What the replay sent (a replay the client cancelled is
                audited as cancelled, with what it had sent by then).
            held: Whether budget granted a hold for the request.
        """
        policy, answer = ctx.tenant_policy, played.answer
        payload = records.audit_payload(
            ctx.request_id,
            ctx.identity,
            ctx.request,
            self._salt,
            body_mode=policy.audit_body_mode,
            retention_days=policy.retention_days,
            transit=self._transit,
            tool_calls=list(answer.tool_calls),
            model=answer.model,
            provider="",
            reason=played.reason,
            cache_hit=True,
            usage=played.usage,
            cost_micro_usd=0,
            status_code=0 if played.finished else _CANCELLED,
            error_reason="",
            latency_ms=played.latency_ms,
            answer_text=answer.text,
            fallbacks=[],
        )
        jobs = [("audit", payload)]
        if held:
            jobs.insert(0, ("release", records.release_payload(ctx.request_id)))
        await self._outbox.put(*jobs)

    def _audit(self, ctx: RequestContext, run: Run, end: chat_api.ChatEnd) -> bytes:
        """The audit record of an answered (or failed) request."""
        outcome, policy, decision = run.outcome, ctx.tenant_policy, ctx.decision
        status_code = (
            outcome.code.value[0]
            if outcome
            else (_CANCELLED if run.finish == chat_pb2.FINISH_REASON_CANCELLED else 0)
        )
        return records.audit_payload(
            ctx.request_id,
            ctx.identity,
            ctx.request,
            self._salt,
            body_mode=policy.audit_body_mode,
            retention_days=policy.retention_days,
            transit=self._transit,
            tool_calls=list(run.tool_calls.values()),
            model=run.model.name if run.model else decision.model.name,
            provider=run.model.provider_id if run.model else "",
            reason=decision.reason,
            cache_hit=False,
            usage=end.usage,
            cost_micro_usd=end.cost_micro_usd,
            status_code=status_code,
            error_reason=reason_name(outcome.reason) if outcome else "",
            latency_ms=end.latency_ms,
            answer_text="".join(run.text),
            fallbacks=[f.model for f in run.fallbacks],
        )


def closing_job(ctx: RequestContext, run: Run) -> tuple[str, bytes]:
    """The budget job that would close ``run`` if it stopped now (the router's journal)."""
    end = run.end(ctx)
    return _budget_job(ctx, run, end, partial=True)


def _budget_job(
    ctx: RequestContext, run: Run, end: chat_api.ChatEnd, *, partial: bool = False
) -> tuple[str, bytes]:
    """Settle what was produced, or release the hold when nothing was."""
    if not run.started:
        return ("release", records.release_payload(ctx.request_id))
    partial = partial or run.finish in _PARTIAL
    payload = records.settle_payload(ctx.request_id, end.cost_micro_usd, end.usage, partial=partial)
    return ("settle", payload)


def _store_job(ctx: RequestContext, run: Run, end: chat_api.ChatEnd) -> tuple[str, bytes] | None:
    """The cache store of a complete answer, when the request and policy allow it."""
    request = ctx.request
    if run.model is None or run.outcome is not None or request.cache.mode not in _STORE_MODES:
        return None
    if not ctx.cacheable or run.finish not in _STORABLE:
        return None
    payload = records.store_payload(
        ctx.request_id,
        ctx.identity,
        request,
        ctx.decision,
        run.model.name,
        "".join(run.text),
        list(run.tool_calls.values()),
        run.finish,
        end.usage,
        end.cost_micro_usd,
        ttl_seconds=request.cache.ttl_seconds or ctx.tenant_policy.cache_ttl_seconds,
        explored_entry_id=run.explored_entry_id,
    )
    return ("cache_store", payload)


def _learning(
    learner: learning.Learner, ctx: RequestContext, run: Run, end: chat_api.ChatEnd
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The arguments of the learner's record for this request (None: not counted)."""
    ok = run.outcome is None and run.started
    if run.finish == chat_pb2.FINISH_REASON_CANCELLED and not ok:
        return None  # the client gave up: not the model's failure
    learned = run.model or ctx.decision.model
    x = ctx.features.vector(learner)
    args = (ctx.tenant_id, ctx.request_id, learned.name, learned.quality, x)
    return args, {"ok": ok, "ttft_ms": run.first_token_ms, "cost_micro_usd": end.cost_micro_usd}


async def _learn(
    learner: learning.Learner, ctx: RequestContext, run: Run, end: chat_api.ChatEnd
) -> None:
    """Records the outcome for the learned policy; best effort, never raises.

    The same as :func:`services.router.learning.record_outcome`, with the
    prompt's features taken from the context rather than computed again.
    """
    try:
        if (found := _learning(learner, ctx, run, end)) is not None:
            await learner.record(*found[0], **found[1])
    except Exception as exc:  # noqa: BLE001 - best effort by design, logged
        log.warning("outcome of %s not recorded for learning: %s", ctx.request_id, exc)


def _learn_into(
    pipe: Any, learner: learning.Learner, ctx: RequestContext, run: Run, end: chat_api.ChatEnd
) -> None:
    """:func:`_learn`, queued on the outbox's pipeline; never raises."""
    try:
        if (found := _learning(learner, ctx, run, end)) is not None:
            learner.record_into(pipe, *found[0], **found[1])
    except Exception as exc:  # noqa: BLE001 - best effort by design, logged
        log.warning("outcome of %s not recorded for learning: %s", ctx.request_id, exc)
