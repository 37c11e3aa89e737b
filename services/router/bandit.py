"""The learned policy's model: Bayesian linear regression per (tenant, model).

For each model a tenant uses, :class:`ArmModel` regresses the answer quality's
residual (quality minus the catalog's prior for the model) on the prompt's
features (:mod:`services.router.features`): linear Thompson sampling.

* ``θ ~ N(0, NOISE_SD² I / PRIOR_PRECISION)`` a priori, so with no data the
  learned policy ranks exactly as the static one.
* Every observation (feature vector ``x``, residual ``r``) updates
  ``A = λI + Σ xxᵀ`` and ``b = Σ r x``; with weight -1 it is taken back out
  (feedback that replaces earlier feedback).
* The posterior mean is ``A⁻¹b``; the predictive spread for a prompt is
  ``NOISE_SD · sqrt(xᵀA⁻¹x)``. Drawing from it for the prompt at hand is
  exactly Thompson sampling for that prompt.

:class:`ArmCounts` counts success, time to first token and cost;
:class:`Estimate` is what a decision reads; :class:`TenantState` holds one
tenant's arms as folded on this replica, and :func:`dump_snapshot` /
:func:`load_snapshot` turn it into bytes and back (npz, no pickle).

Everything here is pure computation: no I/O, no asyncio.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import numpy.typing as npt

from services.router.features import FEATURE_DIM, Vector

PRIOR_PRECISION = 10.0
NOISE_SD = 0.5


def prior_spread(x: Vector) -> float:
    """The predictive spread at ``x`` of a model with no observations."""
    return NOISE_SD * float(np.linalg.norm(x)) / math.sqrt(PRIOR_PRECISION)


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


def dump_snapshot(state: TenantState) -> bytes:
    """The tenant's arms as bytes (npz: names, A, b and n of each arm)."""
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


def load_snapshot(state: TenantState, blob: bytes) -> None:
    """Replaces the arms in ``blob`` (from :func:`dump_snapshot`); ignores another layout."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        if data["a"].shape[1:] != (FEATURE_DIM, FEATURE_DIM):
            return
        for i, name in enumerate(data["names"]):
            arm = state.arm(str(name))
            arm.a, arm.b, arm.n = data["a"][i].copy(), data["b"][i].copy(), float(data["n"][i])
            arm.solve()
