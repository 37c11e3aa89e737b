"""Routing that learns from outcomes: a contextual bandit over prompt features.

The question the router learns to answer is "how good will model M's answer be
for this prompt?". For each (tenant, model) it keeps a Bayesian linear
regression of answer quality on the prompt's features (linear Thompson
sampling): the features are in :mod:`services.router.features`, the
regression in :mod:`services.router.bandit`. This module keeps that state for
every tenant, shares it between replicas through Redis, and bounds exploration.

The reward is the tenant's balanced weights applied to expected quality
(learned quality times observed success rate), cheapness (from prices) and speed
(probed or observed time to first token). Because the weights are the tenant's
and may change, each term's expectation is learned separately and the weighted
sum is taken at decision time (:mod:`services.router.scoring`); for a linear
reward that is the same as learning the sum, and a change of weights takes
effect at once without relearning.

Exploration is bounded per tenant: a decision may follow the posterior sample
instead of the posterior mean only while ``explored + 1 <= rate * decisions``
on this replica (rate = ``TenantPolicy.max_exploration_rate``, default
:data:`DEFAULT_EXPLORATION_RATE`), so no replica — hence not the fleet —
explores more than that share of its decisions.

**Shared state (Redis).** Observations are appended to one Redis stream per
tenant (``XADD``: atomic, totally ordered). Every replica folds the stream,
in stream order, into its in-memory ``A`` and ``b``, reading only new entries
(``XRANGE`` from its last id) at most every :data:`REFRESH_SECONDS` in the
background, so replicas merge by replaying the same log and converge to the
same state; the sums commute, so even the order would not matter. When a
replica has folded :data:`COMPACT_EVERY` entries it stores a snapshot
(``A``, ``b`` and the last id folded) and trims the stream up to it, with a Lua
compare-and-set so only a newer snapshot replaces an older one; a new replica
loads the snapshot, then the tail. Counters (success, latency, cost) are
``HINCRBYFLOAT``. Feedback replaces earlier feedback for the same request:
a Lua script swaps the stored score and appends the old observation with
weight -1 and the new one with weight +1, atomically.

Decisions read only the in-memory snapshot: no I/O, a few tens of
microseconds plus the embedding (about 0.1-0.5 ms).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.stores import lua_script
from services.router import bandit, tasks
from services.router.bandit import ArmCounts, Estimate, TenantState
from services.router.features import FEATURE_DIM, FEATURE_VERSION, Featurizer, Vector

log = logging.getLogger(__name__)

DEFAULT_EXPLORATION_RATE = 0.05
REFRESH_SECONDS = 2.0
COMPACT_EVERY = 5_000
FEEDBACK_TTL_SECONDS = 7 * 24 * 3600


def _keys(tenant: str) -> tuple[str, str, str, str]:
    base = f"orchestra:router:learn:v{FEATURE_VERSION}:{{{tenant}}}"
    return f"{base}:log", f"{base}:snapshot", f"{base}:counts", f"{base}:req:"


class Learner:
    """The learned routing state of every tenant this replica has seen.

    Args:
        redis: The router's Redis; None keeps everything in this process (the
            offline evaluation and benchmarks).
        featurizer: Prompt features (default: WordLlama, loaded once).
        seed: Seeds the posterior sampling (tests, evaluation).
    """

    def __init__(
        self,
        redis: aioredis.Redis | None,
        featurizer: Featurizer | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        self._redis = redis
        self.featurize = featurizer or Featurizer()
        self._rng = np.random.default_rng(seed)
        self._tenants: dict[str, TenantState] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._feedback: Any = (
            redis.register_script(lua_script("services.router", "learning_feedback"))
            if redis
            else None
        )
        self._snapshot: Any = (
            redis.register_script(lua_script("services.router", "learning_snapshot"))
            if redis
            else None
        )

    def state(self, tenant: str) -> TenantState:
        """The tenant's state on this replica (created empty)."""
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = TenantState()
        return state

    # --- decisions (synchronous, no I/O) ---

    def estimates(
        self, tenant: str, x: Vector, arms: Iterable[tuple[str, float]]
    ) -> dict[str, Estimate]:
        """The learned expectations for each (model name, catalog quality) at ``x``.

        Reads the in-memory state only; schedules a background refresh from
        Redis when it is older than :data:`REFRESH_SECONDS`.
        """
        state = self.state(tenant)
        self._maybe_refresh(tenant, state)
        out: dict[str, Estimate] = {}
        for name, prior in arms:
            arm = state.arms.get(name)
            if arm is None:
                # The prior alone: residual 0, spread from the prior precision.
                mean, spread, observations = 0.0, bandit.prior_spread(x), 0.0
            else:
                mean, spread = arm.predict(x)
                observations = arm.n
            counts = state.counts.get(name, ArmCounts())
            out[name] = Estimate(
                quality=prior + mean,
                spread=spread,
                success_rate=counts.success_rate,
                mean_ttft_ms=counts.mean_ttft_ms,
                observations=observations,
            )
        return out

    def sample(self, estimate: Estimate) -> float:
        """One posterior draw of the quality."""
        return float(estimate.quality + estimate.spread * self._rng.standard_normal())

    def may_explore(self, tenant: str, max_rate: float) -> bool:
        """Whether this decision may explore, keeping under ``max_rate``; counts it.

        Args:
            tenant: The tenant.
            max_rate: ``TenantPolicy.max_exploration_rate``; 0 means the
                default, :data:`DEFAULT_EXPLORATION_RATE`.
        """
        rate = max_rate if max_rate > 0 else DEFAULT_EXPLORATION_RATE
        state = self.state(tenant)
        state.decisions += 1
        if state.explored + 1 <= min(rate, 1.0) * state.decisions:
            state.explored += 1
            return True
        return False

    # --- offline training (no Redis) ---

    def train(self, tenant: str, arm: str, xs: Vector, qualities: Vector, prior: float) -> None:
        """Folds logged (features, quality) observations for one model in at once."""
        model = self.state(tenant).arm(arm)
        model.observe_many(xs, qualities - prior)
        model.solve()

    # --- outcomes and feedback (Redis) ---

    async def record(
        self,
        tenant: str,
        request_id: str,
        arm: str,
        prior: float,
        x: Vector,
        *,
        ok: bool,
        ttft_ms: int,
        cost_micro_usd: int,
    ) -> None:
        """Counts one request's outcome and remembers it for feedback."""
        if self._redis is None:
            counts = self.state(tenant).counts.setdefault(arm, ArmCounts())
            counts.calls += 1
            counts.ok += ok
            counts.ttft_ms += ttft_ms if ok else 0
            counts.cost_micro_usd += cost_micro_usd
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            self.record_into(
                pipe,
                tenant,
                request_id,
                arm,
                prior,
                x,
                ok=ok,
                ttft_ms=ttft_ms,
                cost_micro_usd=cost_micro_usd,
            )
            await pipe.execute()

    @property
    def shared(self) -> bool:
        """Whether outcomes go to Redis (so :meth:`record_into` may be used)."""
        return self._redis is not None

    def record_into(
        self,
        pipe: Any,
        tenant: str,
        request_id: str,
        arm: str,
        prior: float,
        x: Vector,
        *,
        ok: bool,
        ttft_ms: int,
        cost_micro_usd: int,
    ) -> None:
        """Queues :meth:`record`'s Redis commands on ``pipe``, a pipeline the
        caller sends (the accountant's, with the outbox's jobs)."""
        _, _, counts_key, req_prefix = _keys(tenant)
        pipe.hincrbyfloat(counts_key, f"{arm}|calls", 1)
        if ok:
            pipe.hincrbyfloat(counts_key, f"{arm}|ok", 1)
            pipe.hincrbyfloat(counts_key, f"{arm}|ttft_ms", ttft_ms)
        pipe.hincrbyfloat(counts_key, f"{arm}|cost", cost_micro_usd)
        if ok:
            key = req_prefix + request_id
            pipe.hset(
                key,
                mapping={"arm": arm, "x": x.astype(np.float32).tobytes(), "prior": prior},
            )
            pipe.expire(key, FEEDBACK_TTL_SECONDS)

    async def feedback(self, tenant: str, request_id: str, score: float) -> bool:
        """Records quality feedback for an answered request; False if unknown.

        Later feedback for the same request replaces earlier. The local state
        is refreshed before returning, so this replica's next decision uses it.
        """
        if self._redis is None or self._feedback is None:
            return False
        log_key, _, _, req_prefix = _keys(tenant)
        found = await self._feedback(keys=[req_prefix + request_id, log_key], args=[repr(score)])
        if found:
            await self.refresh(tenant)
        return bool(found)

    def _maybe_refresh(self, tenant: str, state: TenantState) -> None:
        if self._redis is None or time.monotonic() - state.refreshed_at < REFRESH_SECONDS:
            return
        running = self._refreshing.get(tenant)
        if running is not None and not running.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        state.refreshed_at = time.monotonic()  # one attempt per period, even if it fails
        task = loop.create_task(self._refresh_quietly(tenant))
        self._refreshing[tenant] = task

    async def _refresh_quietly(self, tenant: str) -> None:
        try:
            await self.refresh(tenant)
        except (RedisError, OSError, ValueError) as exc:
            log.warning("learned routing state for %s not refreshed: %s", tenant, exc)

    async def refresh(self, tenant: str) -> None:
        """Folds new observations and counters from Redis into this replica."""
        if self._redis is None:
            return
        # One fold at a time per tenant: two would read the same entries twice.
        async with self._locks.setdefault(tenant, asyncio.Lock()):
            await self._refresh(tenant, self._redis)

    async def _refresh(self, tenant: str, redis: aioredis.Redis) -> None:
        log_key, snapshot_key, counts_key, _ = _keys(tenant)
        state = self.state(tenant)
        state.refreshed_at = time.monotonic()
        if not state.loaded:
            snapshot: Any = await redis.hgetall(snapshot_key)
            if snapshot:
                bandit.load_snapshot(state, snapshot[b"blob"])
                state.last_id = snapshot[b"id"].decode()
            state.loaded = True
        touched: set[str] = set()
        while True:
            start = f"({state.last_id}" if state.last_id else "-"
            entries: Any = await redis.xrange(log_key, min=start, max="+", count=1000)
            for entry_id, fields in entries:
                state.last_id = entry_id.decode()
                x = np.frombuffer(fields[b"x"], dtype=np.float32).astype(np.float64)
                if x.shape != (FEATURE_DIM,):
                    continue
                name = fields[b"a"].decode()
                state.arm(name).observe(x, float(fields[b"y"]), float(fields[b"w"]))
                touched.add(name)
                state.folded_since_snapshot += 1
            if len(entries) < 1000:
                break
        for name in touched:
            # Off the event loop: numpy releases the GIL while it inverts.
            await asyncio.to_thread(state.arms[name].solve)
        raw: Any = await redis.hgetall(counts_key)
        counts: dict[str, ArmCounts] = {}
        for field, value in raw.items():
            name, _, kind = field.decode().rpartition("|")
            entry = counts.setdefault(name, ArmCounts())
            if kind == "calls":
                entry.calls = float(value)
            elif kind == "ok":
                entry.ok = float(value)
            elif kind == "ttft_ms":
                entry.ttft_ms = float(value)
            elif kind == "cost":
                entry.cost_micro_usd = float(value)
        state.counts = counts
        if state.folded_since_snapshot >= COMPACT_EVERY and state.last_id and self._snapshot:
            await self._snapshot(
                keys=[snapshot_key, log_key], args=[state.last_id, bandit.dump_snapshot(state)]
            )
            state.folded_since_snapshot = 0


async def record_outcome(
    learner: Learner,
    tenant: str,
    request_id: str,
    request: chat_api.ChatRequest,
    model_name: str,
    catalog_quality: float,
    *,
    ok: bool,
    cancelled: bool = False,
    ttft_ms: int,
    cost_micro_usd: int,
) -> None:
    """Records one answered (or failed) request for the learned policy.

    Called by the engine's accounting, off the client's path. Never raises:
    learning is best effort and must not disturb settlement or audit.

    Args:
        learner: The router's learner.
        tenant: The caller's tenant.
        request_id: The request (the key SubmitFeedback uses).
        request: The chat request (its prompt gives the features).
        model_name: The model that answered (or, if none did, the chosen one).
        catalog_quality: That model's catalog quality (the prior).
        ok: Whether it answered without error.
        cancelled: The client cancelled before an answer: not the model's
            failure, so nothing is recorded.
        ttft_ms: Time to first token.
        cost_micro_usd: What it cost.
    """
    if cancelled and not ok:
        return
    try:
        text = tasks.prompt_text(request.messages)
        analysis = tasks.analyze(text, request.routing.task_type)
        x = learner.featurize(text, analysis)
        await learner.record(
            tenant,
            request_id,
            model_name,
            catalog_quality,
            x,
            ok=ok,
            ttft_ms=ttft_ms,
            cost_micro_usd=cost_micro_usd,
        )
    except Exception as exc:  # noqa: BLE001 - best effort by design, logged
        log.warning("outcome of %s not recorded for learning: %s", request_id, exc)
