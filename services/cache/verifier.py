"""May a cached entry answer this query? The semantic cache's decision.

The semantic layer finds the nearest few cached prompts of the query's scope
(same tenant, model, system prompt, earlier turns and parameters: a cross-scope
candidate cannot exist). For each candidate, nearest first, it asks
:meth:`Verifier.decide` (or the stateless :meth:`CacheJudge.accept`), and
serves the first one accepted. A candidate is refused, in this order, when:

1. its cosine similarity is below ``threshold`` (``static`` mode) or below
   the ``floor`` (the other modes: candidates below it are not worth the
   verifier's time);
2. either prompt is longer than ``max_chars`` (2,000): long prompts match
   exactly or not at all;
3. a **hard guard** fires (:mod:`services.cache.guards`): the two prompts
   mention different numbers, one is negated and the other not, or one has a
   word where the other has its opposite;
4. the policy says no. Three policies (``mode``):

   * ``static``: the similarity alone, against ``threshold`` (the classic
     semantic cache; kept as the baseline);
   * ``verified`` (the default): a small neural network
     (:mod:`services.cache.weights`) reads cheap features of the pair
     (:mod:`services.cache.features`) and gives the probability that the
     cached prompt asks the same question; the candidate is served when that
     reaches ``cut``.
   * ``adaptive``: vCache-style, with the wrong-answer rate bounded by
     ``delta``. The verifier's probability, corrected by what this entry has
     been observed to get right and wrong (:mod:`services.cache.adaptive`,
     which also says where those labels come from), estimates the chance
     ``alpha`` that serving is right. The entry is served with probability
     ``min(1, delta / (1 - alpha))`` and otherwise **explored**:
     the gateway calls the model as on a miss. So each lookup serves a wrong
     answer with probability at most ``delta`` (when ``alpha`` is calibrated),
     whatever the traffic, and entries that keep being right are served more
     often, entries that were wrong less.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from services.cache import guards
from services.cache.adaptive import EntryState, chance_right
from services.cache.features import pair_features
from services.cache.weights import load_network
from services.common.embeddings import Embedder, load_embedder


class Mode(enum.StrEnum):
    """How a candidate that passed the floor and the guards is judged."""

    STATIC = "static"
    VERIFIED = "verified"
    ADAPTIVE = "adaptive"


class Verdict(enum.StrEnum):
    """What to do with a candidate."""

    HIT = "hit"  # serve the cached answer
    MISS = "miss"  # call the model (and store its answer)
    EXPLORE = "explore"  # call the model, then observe() whether the cached answer was right


@dataclasses.dataclass(frozen=True)
class Decision:
    """The verdict on one candidate.

    Attributes:
        verdict: Serve, miss or explore.
        reason: Why: ``below_threshold``, ``too_long``, ``guard:numbers``,
            ``guard:negation``, ``guard:opposites``, ``guard:earlier_turns``,
            ``static``, ``verifier`` or ``adaptive``.
        probability: The verifier's P(same question) (None when it did not run).
            Pass it to :func:`services.cache.adaptive.observe`.
    """

    verdict: Verdict
    reason: str
    probability: float | None = None

    @property
    def hit(self) -> bool:
        """Whether to serve the cached answer."""
        return self.verdict is Verdict.HIT


@dataclasses.dataclass(frozen=True)
class Policy:
    """The settings of the decision.

    Attributes:
        mode: ``static``, ``verified`` (default) or ``adaptive``.
        threshold: Cosine similarity a candidate must reach in ``static`` mode.
        floor: Cosine similarity below which ``verified`` and ``adaptive``
            modes refuse without asking the verifier (it saves the verifier's
            time; the verifier accepts almost nothing below it).
        cut: Verifier probability to serve in ``verified`` mode (None: the
            cut shipped with the verifier).
        delta: Bound on the probability that a lookup is served a wrong answer
            in ``adaptive`` mode.
        model: The embedding model (selects the shipped verifier).
        max_chars: Longer prompts (either side) never match semantically, only
            exactly: the verifier learned on questions (QQP: about 60
            characters), a small change in a long prompt hides in its
            embedding, and judging one costs time that grows with its length.
    """

    mode: Mode = Mode.VERIFIED
    threshold: float = 0.95
    floor: float = 0.6
    cut: float | None = None
    delta: float = 0.02
    model: str = "wordllama"
    max_chars: int = 2000

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), not {self.delta}")
        for name in ("threshold", "floor"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a cosine in [-1, 1], not {getattr(self, name)}")
        if self.max_chars <= 0:
            raise ValueError(f"max_chars must be positive, not {self.max_chars}")
        if self.cut is not None and not 0.0 <= self.cut <= 1.0:
            raise ValueError(f"cut must be a probability, not {self.cut}")


class Verifier:
    """Judges candidates under a :class:`Policy` (loads the embedder and network once).

    Raises:
        ValueError: ``embedder`` is not ``policy.model``, or no verifier ships
            for that model and the mode needs one (``static`` never does).
    """

    def __init__(self, policy: Policy, embedder: Embedder | None = None) -> None:
        self.policy = policy
        self.embedder = embedder or load_embedder(policy.model)
        if self.embedder.name != policy.model:
            raise ValueError(
                f"embedder {self.embedder.name!r} is not the policy's {policy.model!r}"
            )
        self._network = None if policy.mode is Mode.STATIC else load_network(policy.model)
        self._cut = (
            policy.cut
            if policy.cut is not None
            else (self._network.cut if self._network is not None else 1.0)
        )

    def probability(self, query: str, cached: str) -> float:
        """The verifier's P(``cached`` asks the same question as ``query``)."""
        return float(self.probabilities([(query, cached)])[0])

    def probabilities(self, pairs: Sequence[tuple[str, str]]) -> npt.NDArray[np.float64]:
        """:meth:`probability` for many (query, cached) pairs at once."""
        network = self._network or load_network(self.policy.model)
        rows = pair_features(pairs, self.embedder, with_vectors=network.with_vectors)
        return network.probabilities(rows)

    def decide(
        self,
        query: str,
        cached: str,
        similarity: float,
        *,
        state: EntryState | None = None,
        query_turns: Sequence[str] = (),
        cached_turns: Sequence[str] = (),
        rng: random.Random | None = None,
        probability: float | None = None,
    ) -> Decision:
        """May the entry that asked ``cached`` answer ``query``?

        Args:
            query: The new prompt's compared text (its last user message).
            cached: The candidate entry's compared text.
            similarity: Their cosine similarity (from the index).
            state: The entry's :class:`EntryState` (adaptive mode; None: fresh).
            query_turns: The query's earlier turns, when the caller has not
                already scoped the search by them.
            cached_turns: The entry's earlier turns, likewise.
            rng: Randomness of adaptive mode (default: the ``random`` module).
            probability: The verifier's probability when already computed
                (batch callers); computed here otherwise.
        """
        policy = self.policy
        least = policy.threshold if policy.mode is Mode.STATIC else policy.floor
        if similarity < least:
            return Decision(Verdict.MISS, "below_threshold")
        if max(len(query), len(cached)) > policy.max_chars:
            return Decision(Verdict.MISS, "too_long")
        fired = guards.hard_guards(query, cached, query_turns, cached_turns)
        if fired:
            return Decision(Verdict.MISS, f"guard:{fired[0]}")
        if policy.mode is Mode.STATIC:
            return Decision(Verdict.HIT, "static")
        p = self.probability(query, cached) if probability is None else probability
        if policy.mode is Mode.VERIFIED:
            return Decision(Verdict.HIT if p >= self._cut else Verdict.MISS, "verifier", p)
        alpha = chance_right(p, state or EntryState())
        serve = 1.0 if alpha >= 1.0 else min(1.0, policy.delta / (1.0 - alpha))
        draw = (rng or random).random()
        return Decision(Verdict.HIT if draw < serve else Verdict.EXPLORE, "adaptive", p)


class CacheJudge:
    """The stateless judge the semantic layer calls (``Judge.accept``).

    ``accept(query, cached, similarity, threshold)``: a caller's explicit
    threshold (> 0) asks for the static rule at that cosine (guards still
    apply); 0 means the configured policy. Adaptive mode needs the entry's
    state: call :meth:`Verifier.decide` instead.
    """

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def accept(self, query: str, cached: str, similarity: float, threshold: float) -> bool:
        """Whether the entry that asked ``cached`` may answer ``query``."""
        if threshold > 0:
            return similarity >= threshold and not guards.hard_guards(query, cached)
        return self.verifier.decide(query, cached, similarity).hit

    def accepted(
        self, query: str, candidates: Sequence[tuple[str, float]], threshold: float
    ) -> list[int]:
        """The indices of the (cached text, similarity) candidates that may answer
        ``query``, in order: :meth:`accept` for each, with the verifier run once
        for all the candidates that pass the cheap checks (a lookup's cost)."""
        if threshold > 0 or self.verifier.policy.mode is not Mode.VERIFIED:
            return [
                i
                for i, (cached, similarity) in enumerate(candidates)
                if self.accept(query, cached, similarity, threshold)
            ]
        # probability=1 makes decide() apply only the floor, length and guards.
        passing = [
            i
            for i, (cached, similarity) in enumerate(candidates)
            if self.verifier.decide(query, cached, similarity, probability=1.0).hit
        ]
        if not passing:
            return []
        probabilities = self.verifier.probabilities([(query, candidates[i][0]) for i in passing])
        return [
            i
            for i, p in zip(passing, probabilities, strict=True)
            if self.verifier.decide(query, candidates[i][0], candidates[i][1], probability=p).hit
        ]
