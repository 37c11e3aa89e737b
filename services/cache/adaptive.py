"""What the adaptive policy learns about each cached entry, and from what.

In ``adaptive`` mode (:mod:`services.cache.verifier`) the verifier's
probability is corrected by what this entry has been observed to get right and
wrong (:class:`EntryState`), giving the chance that serving it is right
(:func:`chance_right`).

Where the labels come from in production: on an exploration (and on any miss
that had a candidate above the floor that no guard refused) the gateway has
called the model anyway. After the fresh answer has streamed to the client it
compares the fresh answer with the cached one (:func:`answers_agree`: the
answers' embeddings by the same model at cosine >= 0.9 and no number,
negation or opposite guard firing between them; an LLM judge could replace
it) and calls :func:`observe` with the outcome; the entry's new :class:`EntryState`
is stored with the entry (JSON, :meth:`EntryState.to_json`). Nothing here is
trained on user data at run time: only that per-entry state changes.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from services.cache import guards
from services.common.embeddings import Embedder

MAX_OBSERVATIONS = 32  # most recent (probability, correct) pairs kept per entry
_PRIOR_SD = 1.0  # prior spread of an entry's log-odds offset from the verifier


@dataclasses.dataclass(frozen=True)
class EntryState:
    """What the adaptive policy knows of one cached entry (stored with it as JSON).

    Attributes:
        observations: (verifier probability at that lookup, whether the cached
            answer was right for it), oldest first, at most
            :data:`MAX_OBSERVATIONS`.
        hits: Lookups this entry answered.
        explorations: Lookups where it was a candidate but the model was called.
    """

    observations: tuple[tuple[float, bool], ...] = ()
    hits: int = 0
    explorations: int = 0

    def to_json(self) -> str:
        """Compact JSON, e.g. ``{"v":1,"obs":[[0.913,1]],"hits":4,"explored":1}``."""
        return json.dumps(
            {
                "v": 1,
                "obs": [[round(p, 4), int(c)] for p, c in self.observations],
                "hits": self.hits,
                "explored": self.explorations,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes | None) -> EntryState:
        """Reads :meth:`to_json`'s form; None or empty gives a fresh state."""
        if not text:
            return cls()
        document = json.loads(text)
        return cls(
            observations=tuple((float(p), bool(c)) for p, c in document.get("obs", [])),
            hits=int(document.get("hits", 0)),
            explorations=int(document.get("explored", 0)),
        )

    def offset(self) -> tuple[float, float]:
        """(mean, variance) of this entry's log-odds offset from the verifier.

        The model: P(right) = sigmoid(logit(p) + b) with b ~ N(0, 1) a priori;
        the posterior is its Laplace approximation (a few Newton steps).
        """
        if not self.observations:
            return 0.0, _PRIOR_SD**2
        logits = np.array([_logit(p) for p, _ in self.observations])
        right = np.array([float(c) for _, c in self.observations])
        b = 0.0
        precision = 1.0 / _PRIOR_SD**2
        for _ in range(20):
            q = 1.0 / (1.0 + np.exp(-(logits + b)))
            gradient = float((right - q).sum()) - b / _PRIOR_SD**2
            precision = float((q * (1.0 - q)).sum()) + 1.0 / _PRIOR_SD**2
            step = gradient / precision
            b += step
            if abs(step) < 1e-6:
                break
        return b, 1.0 / precision


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


def chance_right(probability: float, state: EntryState) -> float:
    """The chance that serving this entry is right: the verifier's probability
    corrected by the entry's record (posterior predictive, probit approximation)."""
    mean, variance = state.offset()
    z = (_logit(probability) + mean) / math.sqrt(1.0 + math.pi * variance / 8.0)
    return 1.0 / (1.0 + math.exp(-z))


ANSWERS_AGREE = 0.9  # cosine of two answers' embeddings that counts as the same answer


def answers_agree(fresh: str, cached: str, embedder: Embedder) -> bool:
    """Whether a fresh answer says what the cached one says (the label for :func:`observe`).

    Cheap and strict: the two answers' embeddings must be close and no hard
    guard may fire between them (a changed number or a negation in the answer
    is a different answer). Identical answers (up to case and spacing) agree.
    """
    if " ".join(fresh.lower().split()) == " ".join(cached.lower().split()):
        return True
    if not fresh.strip() or not cached.strip() or guards.hard_guards(fresh, cached):
        return False
    vectors = embedder.embed([fresh, cached])
    return float(vectors[0] @ vectors[1]) >= ANSWERS_AGREE


def observe(state: EntryState, probability: float, correct: bool) -> EntryState:
    """The entry's state after learning whether its answer was right for a lookup.

    Args:
        state: The entry's current state.
        probability: ``Decision.probability`` of that lookup.
        correct: Whether the cached answer was right for it (see the module
            docstring for where this comes from).
    """
    kept = (*state.observations, (float(probability), bool(correct)))[-MAX_OBSERVATIONS:]
    return dataclasses.replace(state, observations=kept)
