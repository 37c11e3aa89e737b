"""Rolling health and latency statistics from probes (no I/O).

Each probe yields an :class:`Outcome`. :func:`record` folds it into the
:class:`ProbeStats` of a provider or a model: a window of the newest probes
(for the median and 95th percentile time to first token, tokens per second
and the error rate), an EWMA of time to first token, and the run of
consecutive failures or passes that drives the state:

* a failure below the threshold: DEGRADED (already UNHEALTHY stays so);
* ``unhealthy_after`` failures in a row: UNHEALTHY;
* a pass: HEALTHY, except that an UNHEALTHY subject needs ``healthy_after``
  passes in a row first, so one lucky probe does not flap it back.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import statistics
from collections.abc import Sequence
from typing import Any

from orchestra.discovery.v1 import discovery_service_pb2 as pb

# The order of badness, for combining a provider's and a model's states.
_RANK: dict[int, int] = {
    pb.HEALTH_STATUS_UNSPECIFIED: 0,
    pb.HEALTH_STATUS_HEALTHY: 1,
    pb.HEALTH_STATUS_DEGRADED: 2,
    pb.HEALTH_STATUS_UNHEALTHY: 3,
}


@dataclasses.dataclass(frozen=True)
class HealthPolicy:
    """How probes turn into a state.

    Attributes:
        window: Probes kept for the percentiles and the error rate.
        unhealthy_after: Failures in a row that make a subject UNHEALTHY.
        healthy_after: Passes in a row that bring an UNHEALTHY one back.
        ewma_alpha: Weight of the newest probe in the EWMA, (0, 1].
    """

    window: int = 20
    unhealthy_after: int = 3
    healthy_after: int = 2
    ewma_alpha: float = 0.3

    def __post_init__(self) -> None:
        if self.window < 1 or self.unhealthy_after < 1 or self.healthy_after < 1:
            raise ValueError("window and thresholds must be at least 1")
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError("ewma_alpha must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One probe.

    Attributes:
        ok: Whether the model answered.
        ttft_ms: Time to the first token, ms (None when it failed).
        tokens_per_second: Generation speed after the first token (None when
            too few tokens came to measure it).
        error: Why it failed ("" when it passed); never holds a secret.
        model_id: The model probed.
        time: When the probe started.
    """

    ok: bool
    ttft_ms: float | None
    tokens_per_second: float | None
    error: str
    model_id: str
    time: datetime.datetime


@dataclasses.dataclass(frozen=True)
class Sample:
    """A probe as the window keeps it."""

    ok: bool
    ttft_ms: float | None = None
    tps: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The form stored in ``probe_stats.samples``."""
        return {"ok": self.ok, "ttft_ms": self.ttft_ms, "tps": self.tps}

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> Sample:
        """Reads the stored form."""
        return cls(bool(item.get("ok")), item.get("ttft_ms"), item.get("tps"))


@dataclasses.dataclass(frozen=True)
class ProbeStats:
    """The rolling statistics of one provider or model."""

    status: int = pb.HEALTH_STATUS_UNSPECIFIED
    window: tuple[Sample, ...] = ()
    ttft_ewma_ms: float | None = None
    consecutive_failures: int = 0
    consecutive_passes: int = 0
    last_error: str = ""
    probed_model_id: str = ""
    last_probe_time: datetime.datetime | None = None


def record(stats: ProbeStats, outcome: Outcome, policy: HealthPolicy) -> ProbeStats:
    """``stats`` with ``outcome`` folded in."""
    sample = Sample(outcome.ok, outcome.ttft_ms, outcome.tokens_per_second)
    window = (*stats.window, sample)[-policy.window :]
    if outcome.ok:
        passes, failures = stats.consecutive_passes + 1, 0
        recovering = stats.status == pb.HEALTH_STATUS_UNHEALTHY and passes < policy.healthy_after
        status = pb.HEALTH_STATUS_UNHEALTHY if recovering else pb.HEALTH_STATUS_HEALTHY
    else:
        passes, failures = 0, stats.consecutive_failures + 1
        down = failures >= policy.unhealthy_after or stats.status == pb.HEALTH_STATUS_UNHEALTHY
        status = pb.HEALTH_STATUS_UNHEALTHY if down else pb.HEALTH_STATUS_DEGRADED
    ewma = stats.ttft_ewma_ms
    if outcome.ttft_ms is not None:
        a = policy.ewma_alpha
        ewma = outcome.ttft_ms if ewma is None else a * outcome.ttft_ms + (1 - a) * ewma
    return ProbeStats(
        status=status,
        window=window,
        ttft_ewma_ms=ewma,
        consecutive_failures=failures,
        consecutive_passes=passes,
        last_error=outcome.error,
        probed_model_id=outcome.model_id,
        last_probe_time=outcome.time,
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of non-empty ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def to_health(stats: ProbeStats) -> pb.Health:
    """The ``Health`` message of ``stats``."""
    ttfts = [s.ttft_ms for s in stats.window if s.ok and s.ttft_ms is not None]
    speeds = [s.tps for s in stats.window if s.ok and s.tps is not None]
    failed = sum(1 for s in stats.window if not s.ok)
    health = pb.Health(
        status=stats.status,  # type: ignore[arg-type]
        ttft_p50_ms=round(statistics.median(ttfts)) if ttfts else 0,
        ttft_p95_ms=round(percentile(ttfts, 95)) if ttfts else 0,
        ttft_ewma_ms=round(stats.ttft_ewma_ms or 0),
        tokens_per_second=statistics.median(speeds) if speeds else 0.0,
        error_rate=failed / len(stats.window) if stats.window else 0.0,
        probe_count=len(stats.window),
        consecutive_failures=stats.consecutive_failures,
        last_error=stats.last_error,
        probed_model_id=stats.probed_model_id,
    )
    if stats.last_probe_time is not None:
        health.last_probe_time.FromDatetime(stats.last_probe_time)
    return health


def worst(*states: int) -> int:
    """The worst of several ``HealthStatus`` values."""
    return max(states, key=lambda s: _RANK.get(s, 0))
