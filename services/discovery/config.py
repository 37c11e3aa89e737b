"""The discovery service's own settings, read once from the environment.

| variable | default | meaning |
| --- | --- | --- |
| ``ORCHESTRA_DISCOVERY_INTERVAL_SECONDS`` | 60 | time between discovery passes |
| ``ORCHESTRA_DISCOVERY_HEARTBEAT_SECONDS`` | 15 | WatchModels heartbeat interval (at most 30, as the contract promises) |
| ``ORCHESTRA_PROBE_INTERVAL_SECONDS`` | 60 | time between two health probes of one provider |
| ``ORCHESTRA_PROBE_TIMEOUT_SECONDS`` | 20 | time a probe may take |
| ``ORCHESTRA_PROBE_CONCURRENCY`` | 8 | probes in flight per replica |
| ``ORCHESTRA_PROBE_UNHEALTHY_AFTER`` | 3 | failed probes in a row that make a provider or model UNHEALTHY |
| ``ORCHESTRA_PROBE_HEALTHY_AFTER`` | 2 | passing probes in a row that bring it back |
"""  # noqa: E501 - a table reads better unwrapped

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from services.common.settings import SettingsError
from services.discovery.health import HealthPolicy
from services.providers.listing import DEFAULT_DEADLINE_SECONDS

MAX_HEARTBEAT_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """The probe schedule.

    Attributes:
        interval_seconds: Time between two probes of one provider.
        timeout_seconds: Time one probe may take before it counts as failed.
        concurrency: Probes in flight at once, per replica.
        batch: Providers claimed per tick.
        tick_seconds: How often a replica looks for due providers.
        policy: How probes turn into a health state.
    """

    interval_seconds: float = 60.0
    timeout_seconds: float = 20.0
    concurrency: int = 8
    batch: int = 100
    tick_seconds: float = 5.0
    policy: HealthPolicy = dataclasses.field(default_factory=HealthPolicy)

    def __post_init__(self) -> None:
        if self.interval_seconds <= 0 or self.timeout_seconds <= 0 or self.tick_seconds <= 0:
            raise ValueError("probe interval, timeout and tick must be greater than 0")
        if self.concurrency < 1 or self.batch < 1:
            raise ValueError("probe concurrency and batch must be at least 1")


@dataclasses.dataclass(frozen=True)
class DiscoveryConfig:
    """Discovery's own knobs.

    Attributes:
        interval_seconds: Time between periodic discovery passes.
        heartbeat_seconds: WatchModels heartbeat interval (at most 30).
        listing_deadline_seconds: Time allowed to list one provider.
        probes: The health probe schedule.
    """

    interval_seconds: float = 60.0
    heartbeat_seconds: float = 15.0
    listing_deadline_seconds: float = DEFAULT_DEADLINE_SECONDS
    probes: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if self.interval_seconds <= 0:
            raise SettingsError("ORCHESTRA_DISCOVERY_INTERVAL_SECONDS must be greater than 0")
        if not 0 < self.heartbeat_seconds <= MAX_HEARTBEAT_SECONDS:
            raise SettingsError(
                f"ORCHESTRA_DISCOVERY_HEARTBEAT_SECONDS must be in (0, {MAX_HEARTBEAT_SECONDS:g}]"
            )
        if self.listing_deadline_seconds <= 0:
            raise SettingsError("the listing deadline must be greater than 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DiscoveryConfig:
        """Reads the settings.

        Args:
            env: The environment (defaults to ``os.environ``).

        Raises:
            SettingsError: A value is not a number or out of range; the
                message names the variable.
        """
        env = os.environ if env is None else env
        try:
            probes = ProbeConfig(
                interval_seconds=_number(env, "ORCHESTRA_PROBE_INTERVAL_SECONDS", 60.0),
                timeout_seconds=_number(env, "ORCHESTRA_PROBE_TIMEOUT_SECONDS", 20.0),
                concurrency=int(_number(env, "ORCHESTRA_PROBE_CONCURRENCY", 8)),
                policy=HealthPolicy(
                    unhealthy_after=int(_number(env, "ORCHESTRA_PROBE_UNHEALTHY_AFTER", 3)),
                    healthy_after=int(_number(env, "ORCHESTRA_PROBE_HEALTHY_AFTER", 2)),
                ),
            )
        except ValueError as exc:
            raise SettingsError(f"ORCHESTRA_PROBE_*: {exc}") from None
        return cls(
            interval_seconds=_number(env, "ORCHESTRA_DISCOVERY_INTERVAL_SECONDS", 60.0),
            heartbeat_seconds=_number(env, "ORCHESTRA_DISCOVERY_HEARTBEAT_SECONDS", 15.0),
            probes=probes,
        )


def _number(env: Mapping[str, str], var: str, default: float) -> float:
    text = env.get(var)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise SettingsError(f"{var} must be a number, got {text!r}") from None
