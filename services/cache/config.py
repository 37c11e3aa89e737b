"""The cache service's own settings, read once from the environment.

| variable | default | meaning |
| --- | --- | --- |
| ``ORCHESTRA_CACHE_MAX_TEMPERATURE`` | 0.5 | answers sampled hotter are not stored |
| ``ORCHESTRA_CACHE_STORE_UNSET_TEMPERATURE`` | true | store answers whose request left temperature unset (see :mod:`services.cache.policy`) |
| ``ORCHESTRA_CACHE_TTL_SECONDS`` | 86400 | lifetime of an entry when Store gives none |
| ``ORCHESTRA_CACHE_MAX_ENTRY_BYTES`` | 1048576 | larger answers are not stored |
| ``ORCHESTRA_CACHE_MAX_ENTRIES_PER_TENANT`` | 100000 | a tenant's oldest entries are evicted beyond this many |
| ``ORCHESTRA_CACHE_MAX_BYTES_PER_TENANT`` | 1073741824 | … or beyond this many bytes of answers |
| ``ORCHESTRA_CACHE_LATENCY_WINDOW`` | 1024 | lookups per tenant behind the p50/p99 |
| ``ORCHESTRA_CACHE_SEMANTIC`` | true | answer paraphrases from the semantic layer (false: exact matches only) |
| ``ORCHESTRA_CACHE_EMBEDDING_MODEL`` | wordllama | the packaged embedding model (see :mod:`services.common.embeddings`) |
| ``ORCHESTRA_CACHE_SEMANTIC_MODE`` | verified | how a near match is judged: ``verified``, ``static`` or ``adaptive`` (see :mod:`services.cache.verifier`) |
| ``ORCHESTRA_CACHE_SIMILARITY_THRESHOLD`` | 0.95 in ``static`` mode, else 0.6 | cosine a near match must reach (the whole rule in ``static`` mode; the floor before the verifier otherwise) |
| ``ORCHESTRA_CACHE_VERIFIER_CUT`` | the shipped cut (0.83) | verifier probability needed to serve, ``verified`` mode |
| ``ORCHESTRA_CACHE_WRONG_ANSWER_BOUND`` | 0.02 | bound on the chance a lookup is served a wrong answer, ``adaptive`` mode |
| ``ORCHESTRA_CACHE_HNSW_FROM`` | 10000 | entries in one scope from which its index is HNSW instead of exact |
"""  # noqa: E501 - a table reads better unwrapped

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

from services.common.settings import SettingsError

_TRUE = ("1", "true", "yes", "on")
_MODES = ("verified", "static", "adaptive")
_STATIC_THRESHOLD = 0.95  # measured by bench/cache_eval.py: cosine alone needs this much
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Eligibility, lifetime and measurement settings of the cache.

    Attributes:
        max_temperature: Highest temperature whose answers are stored.
        store_unset_temperature: Whether answers to requests that left the
            temperature unset are stored.
        default_ttl_seconds: Lifetime of an entry when Store gives none.
        max_entry_bytes: Largest serialised answer that is stored.
        max_entries_per_tenant: Entries a tenant may hold before its oldest
            are evicted.
        max_bytes_per_tenant: Answer bytes a tenant may hold before its
            oldest entries are evicted.
        latency_window: How many recent lookups per tenant the latency
            percentiles are computed over.
        semantic: Whether the semantic layer answers near matches.
        embedding_model: The embedding model's name.
        semantic_mode: ``verified``, ``static`` or ``adaptive``.
        similarity_threshold: Cosine similarity a near match must reach.
        verifier_cut: Verifier probability needed to serve (None: shipped).
        wrong_answer_bound: The adaptive mode's bound on wrong answers.
        hnsw_from: Entries in one scope from which its index is HNSW.
    """

    max_temperature: float = 0.5
    store_unset_temperature: bool = True
    default_ttl_seconds: int = 86_400
    max_entry_bytes: int = 1_048_576
    max_entries_per_tenant: int = 100_000
    max_bytes_per_tenant: int = 1 << 30
    latency_window: int = 1024
    semantic: bool = True
    embedding_model: str = "wordllama"
    semantic_mode: str = "verified"
    similarity_threshold: float = 0.6
    verifier_cut: float | None = None
    wrong_answer_bound: float = 0.02
    hnsw_from: int = 10_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CacheConfig:
        """Reads the settings.

        Args:
            env: The environment (defaults to ``os.environ``).

        Raises:
            SettingsError: A value is malformed; the message names the variable.
        """
        env = os.environ if env is None else env
        defaults = cls()
        return cls(
            max_temperature=_float(
                env, "ORCHESTRA_CACHE_MAX_TEMPERATURE", defaults.max_temperature, 0.0, 2.0
            ),
            store_unset_temperature=_bool(
                env, "ORCHESTRA_CACHE_STORE_UNSET_TEMPERATURE", defaults.store_unset_temperature
            ),
            default_ttl_seconds=_int(
                env, "ORCHESTRA_CACHE_TTL_SECONDS", defaults.default_ttl_seconds, 2**31 - 1
            ),
            max_entry_bytes=_int(
                env, "ORCHESTRA_CACHE_MAX_ENTRY_BYTES", defaults.max_entry_bytes, 2**31 - 1
            ),
            max_entries_per_tenant=_int(
                env,
                "ORCHESTRA_CACHE_MAX_ENTRIES_PER_TENANT",
                defaults.max_entries_per_tenant,
                2**31 - 1,
            ),
            max_bytes_per_tenant=_int(
                env,
                "ORCHESTRA_CACHE_MAX_BYTES_PER_TENANT",
                defaults.max_bytes_per_tenant,
                2**62,
            ),
            latency_window=_int(
                env, "ORCHESTRA_CACHE_LATENCY_WINDOW", defaults.latency_window, 1_000_000
            ),
            semantic=_bool(env, "ORCHESTRA_CACHE_SEMANTIC", defaults.semantic),
            embedding_model=env.get("ORCHESTRA_CACHE_EMBEDDING_MODEL", "").strip()
            or defaults.embedding_model,
            semantic_mode=_choice(
                env, "ORCHESTRA_CACHE_SEMANTIC_MODE", defaults.semantic_mode, _MODES
            ),
            similarity_threshold=_float(
                env,
                "ORCHESTRA_CACHE_SIMILARITY_THRESHOLD",
                _STATIC_THRESHOLD
                if env.get("ORCHESTRA_CACHE_SEMANTIC_MODE", "").strip().lower() == "static"
                else defaults.similarity_threshold,
                0.0,
                1.0,
            ),
            verifier_cut=_float(env, "ORCHESTRA_CACHE_VERIFIER_CUT", -1.0, 0.0, 1.0)
            if env.get("ORCHESTRA_CACHE_VERIFIER_CUT", "")
            else None,
            wrong_answer_bound=_float(
                env,
                "ORCHESTRA_CACHE_WRONG_ANSWER_BOUND",
                defaults.wrong_answer_bound,
                0.0001,
                0.5,
            ),
            hnsw_from=_int(env, "ORCHESTRA_CACHE_HNSW_FROM", defaults.hnsw_from, 2**31 - 1),
        )


def _float(env: Mapping[str, str], var: str, default: float, low: float, high: float) -> float:
    raw = env.get(var, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{var} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise SettingsError(f"{var} must be between {low:g} and {high:g}, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], var: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(var, "").strip().lower()
    if not raw:
        return default
    if raw not in allowed:
        raise SettingsError(f"{var} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


def _int(env: Mapping[str, str], var: str, default: int, high: int) -> int:
    raw = env.get(var, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{var} must be a whole number, got {raw!r}") from None
    if not 1 <= value <= high:
        raise SettingsError(f"{var} must be between 1 and {high}, got {raw!r}")
    return value


def _bool(env: Mapping[str, str], var: str, default: bool) -> bool:
    raw = env.get(var, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise SettingsError(f"{var} must be true or false, got {raw!r}")
