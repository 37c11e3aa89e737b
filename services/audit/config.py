"""The audit service's own settings, read once at start and frozen.

They come from the suite's :class:`~services.common.settings.Settings` and, for
the checkpoint signing key, from the environment (:mod:`services.audit.signing`):

| setting | source | default | meaning |
| --- | --- | --- | --- |
| ``database_url`` | ``DATABASE_URL`` / ``server.database_url`` | required | the log, the tree, checkpoints, sealed bodies |
| ``internal_key`` | ``ORCHESTRA_INTERNAL_KEY`` | required | checks identities; wraps body keys; derives the signing key when none is set |
| ``signing_key`` | ``ORCHESTRA_AUDIT_SIGNING_KEY`` / ``ORCHESTRA_AUDIT_SIGNING_KEY_FILE`` | derived | signs checkpoints (Ed25519) |
| ``retention_sweep_seconds`` | — | 3600 | how often bodies past their tenant's retention are dropped |
"""  # noqa: E501 - a table reads better unwrapped

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from services.audit.signing import KEY_ENV, KEY_FILE_ENV
from services.common.settings import Settings, require

# How often expired bodies are dropped; retention is counted in days.
RETENTION_SWEEP_SECONDS = 3600.0


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """Everything the audit process reads at start.

    Attributes:
        database_url: The audit service's PostgreSQL.
        internal_key: ORCHESTRA_INTERNAL_KEY.
        signing_env: The signing-key variables that are set (passed to
            :func:`services.audit.signing.load_signer`).
        retention_sweep_seconds: Time between two retention sweeps.
    """

    database_url: str
    internal_key: bytes
    signing_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    retention_sweep_seconds: float = RETENTION_SWEEP_SECONDS

    @classmethod
    def from_settings(cls, settings: Settings, env: Mapping[str, str] | None = None) -> AuditConfig:
        """Reads the audit service's part of ``settings`` and of ``env`` (os.environ).

        Raises:
            SettingsError: DATABASE_URL is not set.
        """
        env = os.environ if env is None else env
        return cls(
            database_url=require(settings.database_url, "DATABASE_URL", "audit"),
            internal_key=settings.internal_key,
            signing_env={name: env[name] for name in (KEY_ENV, KEY_FILE_ENV) if env.get(name)},
        )
