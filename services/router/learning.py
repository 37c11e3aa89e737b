"""Routing that learns from outcomes: a contextual bandit over prompt features.

The question the router learns to answer is "how good will model M's answer be
for this prompt?". For each (tenant, model) it keeps a Bayesian linear
regression (linear Thompson sampling) of answer quality on the prompt's
features:

* Features ``x``: the task analysis (:mod:`services.router.tasks`: one-hot
  task type, complexity, length, numbers, …), the first
  :data:`EMBEDDING_DIMS` dimensions of the prompt's WordLlama embedding
  (Matryoshka-trained, so a prefix is itself an embedding; renormalised and
  scaled by :data:`EMBEDDING_SCALE`), the prompt's words hashed into
  :data:`WORD_BUCKETS` buckets (present or not, normalised, scaled by
  :data:`WORD_SCALE`: they pick up subject and difficulty words the small
  embedding blurs), and a constant. The sizes and scales were chosen by
  cross-validation on the train half of the routing data only.
* Quality ``q(x) = prior + θ·x``: the prior is the catalog's quality for the
  model, so with no data the learned policy ranks exactly as the static one;
  ``θ ~ N(0, NOISE_SD² I / PRIOR_PRECISION)`` a priori; every observation (feature
  vector, quality score) updates ``A = λI + Σ xxᵀ`` and ``b = Σ (q - prior) x``.
  The posterior mean is ``A⁻¹b``; the predictive spread for a prompt is
  ``NOISE_SD · sqrt(xᵀA⁻¹x)`` — drawing from it for the prompt at hand is
  exactly Thompson sampling for that prompt.
* Success, time to first token and cost are counted per (tenant, model).

The reward is the tenant's balanced weights applied to expected quality
(learned quality times observed success rate), cheapness (from prices) and speed
(probed or observed time to first token). Because the weights are the tenant's
and may change, each term's expectation is learned separately and the weighted
sum is taken at decision time; for a linear reward that is the same as learning
the sum, and a change of weights takes effect at once without relearning.

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
import dataclasses
import io
import logging
import math
import re
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.embeddings import Embedder, load_embedder
from services.common.stores import lua_script
from services.router import tasks

log = logging.getLogger(__name__)

EMBEDDING_MODEL = "wordllama"
EMBEDDING_DIMS = 64
EMBEDDING_SCALE = 0.35
EMBED_MAX_CHARS = 2_000
WORD_BUCKETS = 128
WORD_SCALE = 0.5
PRIOR_PRECISION = 10.0
NOISE_SD = 0.5
DEFAULT_EXPLORATION_RATE = 0.05
REFRESH_SECONDS = 2.0
COMPACT_EVERY = 5_000
FEEDBACK_TTL_SECONDS = 7 * 24 * 3600
# Bump when the feature layout changes: old state is then ignored, not misread.
FEATURE_VERSION = 1

FEATURE_DIM = len(tasks.FEATURE_NAMES) + EMBEDDING_DIMS + WORD_BUCKETS + 1
_WORD = re.compile(r"[a-z]{3,}")
Vector = npt.NDArray[np.float64]


class Featurizer:
    """Turns a prompt into the learned policy's feature vector."""

    def __init__(self, embedder: Embedder | None = None) -> None:
        self._embedder = embedder or load_embedder(EMBEDDING_MODEL)

    def __call__(self, text: str, analysis: tasks.TaskAnalysis) -> Vector:
        """The features of one prompt (length :data:`FEATURE_DIM`)."""
        row: Vector = self.many([text], [analysis])[0]
        return row

    def many(self, texts: Sequence[str], analyses: Sequence[tasks.TaskAnalysis]) -> Vector:
        """The features of many prompts, one row each."""
        embedded = self._embedder.embed([t[:EMBED_MAX_CHARS] for t in texts])
        vectors: Vector = embedded[:, :EMBEDDING_DIMS].astype(np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = EMBEDDING_SCALE * vectors / np.where(norms > 0, norms, 1.0)
        task = np.asarray([a.features for a in analyses], dtype=np.float64)
        words = np.zeros((len(texts), WORD_BUCKETS))
        for row, text in enumerate(texts):
            for word in set(_WORD.findall(text[:EMBED_MAX_CHARS].lower())):
                words[row, zlib.crc32(word.encode()) % WORD_BUCKETS] = 1.0
        counts = np.sqrt(words.sum(axis=1, keepdims=True))
        words = WORD_SCALE * words / np.where(counts > 0, counts, 1.0)
        ones = np.ones((len(texts), 1))
        features: Vector = np.hstack([task.reshape(len(texts), -1), vectors, words, ones])
        return features


class ArmModel:
    """Bayesian linear regression of one model's quality residual for one tenant."""

    __slots__ = ("_posterior", "a", "b", "n")

    def __init__(self, dim: int = FEATURE_DIM) -> None:
        self.a: Vector = PRIOR_PRECISION * np.eye(dim)
        self.b: Vector = np.zeros(dim)
        self.n = 0.0
        # (covariance / noise², as float32 for speed; mean), replaced as one
        # value so a reader never pairs a new covariance with an old mean.
        self._posterior: tuple[npt.NDArray[np.float32], Vector] | None = None

    def observe(self, x: Vector, residual: float, weight: float = 1.0) -> None:
        """Adds (or, with weight -1, removes) one observation."""
        self.a += weight * np.outer(x, x)
        self.b += weight * residual * x
        self.n += weight

    def observe_many(self, xs: Vector, residuals: Vector) -> None:
        """Adds many observations at once (same result as one by one)."""
        self.a += xs.T @ xs
        self.b += xs.T @ residuals
        self.n += len(residuals)

    def solve(self) -> None:
        """Refreshes the posterior from the observations so far.

        Predictions use the posterior of the last solve (the first predict
        solves), so observations take effect when the owner calls this.
        """
        cov: Vector = np.linalg.inv(self.a).astype(np.float64)
        self._posterior = (cov.astype(np.float32), cov @ self.b)

    def predict(self, x: Vector) -> tuple[float, float]:
        """Posterior mean and standard deviation of the residual at ``x``."""
        if self._posterior is None:
            self.solve()
        assert self._posterior is not None
        cov, mean = self._posterior
        x32 = x.astype(np.float32)
        variance = float(x32 @ cov @ x32)
        return float(mean @ x), NOISE_SD * math.sqrt(max(variance, 0.0))


@dataclasses.dataclass
class ArmCounts:
    """Outcome counters of one (tenant, model)."""

    calls: float = 0.0
    ok: float = 0.0
    ttft_ms: float = 0.0
    cost_micro_usd: float = 0.0

    @property
    def success_rate(self) -> float:
        """Observed success share, starting from one success in one call."""
        return (self.ok + 1.0) / (self.calls + 1.0)

    @property
    def mean_ttft_ms(self) -> float:
        """Mean observed time to first token, 0 when nothing was observed."""
        return self.ttft_ms / self.ok if self.ok else 0.0


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What the learned policy expects of one model for one prompt.

    Attributes:
        quality: Posterior mean answer quality (prior + learned residual), 0-1.
        spread: Posterior standard deviation of ``quality``.
        success_rate: Observed share of requests answered without error.
        mean_ttft_ms: Observed mean time to first token, 0 if none.
        observations: Quality observations behind the estimate.
    """

    quality: float
    spread: float
    success_rate: float
    mean_ttft_ms: float
    observations: float

    def expected_quality(self, sample: float | None = None) -> float:
        """Quality (or a posterior ``sample`` of it) times the success rate.

        Not clipped to 0-1: the linear estimate may stray a little outside, and
        clipping would tie exactly the prompts whose order matters most.
        """
        value = self.quality if sample is None else sample
        return value * self.success_rate


@dataclasses.dataclass
class TenantState:
    """One tenant's learned state, as folded on this replica."""

    arms: dict[str, ArmModel] = dataclasses.field(default_factory=dict)
    counts: dict[str, ArmCounts] = dataclasses.field(default_factory=dict)
    last_id: str = ""
    loaded: bool = False
    folded_since_snapshot: int = 0
    refreshed_at: float = 0.0
    decisions: int = 0
    explored: int = 0

    def arm(self, name: str) -> ArmModel:
        """The model's regression, created at the prior."""
        model = self.arms.get(name)
        if model is None:
            model = self.arms[name] = ArmModel()
        return model


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
                spread = NOISE_SD * float(np.linalg.norm(x)) / math.sqrt(PRIOR_PRECISION)
                mean, observations = 0.0, 0.0
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
        _, _, counts_key, req_prefix = _keys(tenant)
        async with self._redis.pipeline(transaction=True) as pipe:
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
            await pipe.execute()

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
                _load_snapshot(state, snapshot[b"blob"])
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
                keys=[snapshot_key, log_key], args=[state.last_id, _dump_snapshot(state)]
            )
            state.folded_since_snapshot = 0


def _dump_snapshot(state: TenantState) -> bytes:
    names = sorted(state.arms)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        names=np.asarray(names),
        a=np.stack([state.arms[n].a for n in names]),
        b=np.stack([state.arms[n].b for n in names]),
        n=np.asarray([state.arms[n].n for n in names]),
    )
    return buffer.getvalue()


def _load_snapshot(state: TenantState, blob: bytes) -> None:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        if data["a"].shape[1:] != (FEATURE_DIM, FEATURE_DIM):
            return
        for i, name in enumerate(data["names"]):
            arm = state.arm(str(name))
            arm.a, arm.b, arm.n = data["a"][i].copy(), data["b"][i].copy(), float(data["n"][i])
            arm.solve()


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
