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
   * ``verified`` (the default): a small neural network (one hidden layer,
     numpy at run time) reads cheap features of the pair (below) and gives the
     probability that the cached prompt asks the same question; the candidate
     is served when that reaches ``cut``. The network was trained by
     ``bench/train_cache_verifier.py`` on one half of the QQP dev pairs (split
     by a hash of the pair) and ships as ``verifier_wordllama.json``; the
     other half is ``bench/cache_eval.py``'s held-out test.
   * ``adaptive``: vCache-style, with the wrong-answer rate bounded by
     ``delta``. The verifier's probability, corrected by what this entry has
     been observed to get right and wrong (:class:`EntryState`), estimates the
     chance ``alpha`` that serving is right. The entry is served with
     probability ``min(1, delta / (1 - alpha))`` and otherwise **explored**:
     the gateway calls the model as on a miss. So each lookup serves a wrong
     answer with probability at most ``delta`` (when ``alpha`` is calibrated),
     whatever the traffic, and entries that keep being right are served more
     often, entries that were wrong less.

Where the labels come from in production: on an exploration (and on any miss
that had a candidate above the floor that no guard refused) the gateway has
called the model anyway. After the fresh answer has streamed to the client it
compares the fresh answer with the cached one (:func:`answers_agree`: the
answers' embeddings by the same model at cosine >= 0.9 and no number,
negation or opposite guard firing between them; an LLM judge could replace
it) and calls :func:`observe` with the outcome; the entry's new :class:`EntryState`
is stored with the entry (JSON, :meth:`EntryState.to_json`). Nothing here is
trained on user data at run time: only that per-entry state changes.

The features (one definition, used at run time and by the trainer): the
cosine and its square; word and content-word Jaccard overlap; length ratio and
gap; the guard flags (numbers differ, a number on one side only, negation,
names); whether the question words differ ("how" / "why"); the share of
content words of each side absent from the other; how many content words have
no partner in the other text at word-vector cosine 0.8, and the mean and worst
best-partner cosine; and the element-wise ``|a - b|`` and ``a * b`` of the two
sentence vectors.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.cache import guards
from services.common.embeddings import Embedder, load_embedder

#: Names of the scalar features, in order (the vector features follow them).
SCALAR_FEATURES: tuple[str, ...] = (
    "cosine",
    "cosine_sq",
    "word_jaccard",
    "content_jaccard",
    "length_ratio",
    "log_length_gap",
    "numbers_differ",
    "numbers_one_sided",
    "negation_differs",
    "entities_differ",
    "question_word_differs",
    "only_query_share",
    "only_cached_share",
    "unaligned_max",
    "unaligned_min",
    "aligned_mean_min",
    "aligned_worst",
    "content_count_gap",
)

_QUESTION_WORDS = frozenset(
    guards.words(
        "what why how when where who whom whose which is are can could do does did should "
        "would will was were has have"
    )
)
_ALIGNED = 0.8  # a word "has a partner" in the other text at this word-vector cosine
# Words of one text that the alignment compares: bounds its cost on long prompts
# (a 256 x 256 product at most); QQP questions never reach it.
_MAX_ALIGNED = 256


def _aligned_words(text: str) -> list[str]:
    return sorted(set(guards.content_words(text)))[:_MAX_ALIGNED]


_Array = npt.NDArray[np.float64]


def _question_word(text: str) -> str:
    return next((w for w in guards.words(text) if w in _QUESTION_WORDS), "")


def _alignment(
    mine: Sequence[str], theirs: Sequence[str], vectors: dict[str, npt.NDArray[np.float32]]
) -> tuple[float, float, float]:
    """(share of ``mine`` with no partner, mean best match, worst best match)."""
    if not mine:
        return 0.0, 1.0, 1.0
    if not theirs:
        return 1.0, 0.0, 0.0
    a = np.stack([vectors[w] for w in mine])
    b = np.stack([vectors[w] for w in theirs])
    best = (a @ b.T).max(axis=1)
    return float((best < _ALIGNED).mean()), float(best.mean()), float(best.min())


def scalar_features(
    query: str,
    cached: str,
    sentence: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
    word_vectors: dict[str, npt.NDArray[np.float32]],
) -> _Array:
    """The :data:`SCALAR_FEATURES` of one pair.

    Args:
        query: The new prompt.
        cached: The cached prompt.
        sentence: The two sentence vectors (unit length).
        word_vectors: A unit vector for every word :func:`_aligned_words` gives
            for either text.
    """
    cosine = float(sentence[0] @ sentence[1])
    words_q, words_c = guards.words(query), guards.words(cached)
    set_q, set_c = set(words_q), set(words_c)
    content_q, content_c = guards.content_words(query), guards.content_words(cached)
    cset_q, cset_c = set(content_q), set(content_c)
    only_q = [w for w in cset_q if w not in cset_c]
    only_c = [w for w in cset_c if w not in cset_q]
    aligned_q, aligned_c = _aligned_words(query), _aligned_words(cached)
    unaligned_q, mean_q, worst_q = _alignment(aligned_q, aligned_c, word_vectors)
    unaligned_c, mean_c, worst_c = _alignment(aligned_c, aligned_q, word_vectors)
    len_q, len_c = len(words_q), len(words_c)
    return np.array(
        [
            cosine,
            cosine * cosine,
            len(set_q & set_c) / max(1, len(set_q | set_c)),
            len(cset_q & cset_c) / max(1, len(cset_q | cset_c)),
            min(len_q, len_c) / max(1, len_q, len_c),
            float(np.log1p(abs(len_q - len_c))),
            float(guards.numbers_differ(query, cached)),
            float(guards.numbers_one_sided(query, cached)),
            float(guards.negation_differs(query, cached)),
            float(guards.entities_differ(query, cached)),
            float(_question_word(query) != _question_word(cached)),
            len(only_q) / max(1, len(cset_q)),
            len(only_c) / max(1, len(cset_c)),
            max(unaligned_q, unaligned_c),
            min(unaligned_q, unaligned_c),
            min(mean_q, mean_c),
            min(worst_q, worst_c),
            float(np.log1p(abs(len(cset_q) - len(cset_c)))),
        ],
        dtype=np.float64,
    )


def pair_features(
    pairs: Sequence[tuple[str, str]], embedder: Embedder, *, with_vectors: bool
) -> _Array:
    """Feature rows for ``pairs`` of (query, cached prompt), one row each.

    A row is the :data:`SCALAR_FEATURES`, then, when ``with_vectors``, the
    element-wise ``|a - b|`` and ``a * b`` of the two sentence vectors.
    Everything is embedded in two batches (sentences, then distinct words).
    """
    if not pairs:
        width = len(SCALAR_FEATURES) + (2 * embedder.dim if with_vectors else 0)
        return np.zeros((0, width), dtype=np.float64)
    sentences = embedder.embed([text for pair in pairs for text in pair])
    vocabulary = sorted({w for pair in pairs for text in pair for w in _aligned_words(text)})
    word_vectors = dict(zip(vocabulary, embedder.embed(vocabulary), strict=True))
    rows = []
    for i, (query, cached) in enumerate(pairs):
        a, b = sentences[2 * i], sentences[2 * i + 1]
        row = scalar_features(query, cached, (a, b), word_vectors)
        if with_vectors:
            row = np.concatenate([row, np.abs(a - b), a * b])
        rows.append(row)
    return np.stack(rows)


# --- the verifier network -----------------------------------------------------

WEIGHTS_DIR = Path(__file__).parent
WEIGHTS_FORMAT = 1


def weights_path(model: str) -> Path:
    """Where the verifier trained for embedding model ``model`` ships."""
    return WEIGHTS_DIR / f"verifier_{model.replace('-', '_')}.json"


def encode_array(array: npt.NDArray[Any]) -> dict[str, Any]:
    """An array as JSON: its shape and its float32 little-endian bytes in base64."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(data.shape), "f32": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_array(document: dict[str, Any]) -> npt.NDArray[np.float64]:
    """The inverse of :func:`encode_array` (as float64)."""
    raw = np.frombuffer(base64.b64decode(document["f32"]), dtype="<f4")
    return raw.reshape(document["shape"]).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Network:
    """A trained verifier: standardisation, ReLU hidden layers, a logistic output.

    Attributes:
        model: The embedding model it was trained with (its features depend on it).
        with_vectors: Whether its rows include the sentence-vector features.
        mean: Per-feature mean subtracted before the first layer.
        scale: Per-feature divisor after that.
        layers: (weights ``(in, out)``, biases) of each layer; ReLU between them.
        cut: The probability at which ``verified`` mode serves (chosen on the
            training half: the lowest cut whose precision there reached the target).
        cosine_weight: Weight of the raw cosine added to the output logit (the
            calibration step's second input: the network alone under-rates
            near-identical pairs).
        info: How it was trained (data, split, sizes, training-half figures).
    """

    model: str
    with_vectors: bool
    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    layers: tuple[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]], ...]
    cut: float
    info: dict[str, Any]
    cosine_weight: float = 0.0

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Network:
        """Reads the document :meth:`to_json` wrote."""
        if document.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"verifier weights format {document.get('format')!r} is not 1")
        return cls(
            model=document["model"],
            with_vectors=bool(document["with_vectors"]),
            mean=decode_array(document["mean"]),
            scale=decode_array(document["scale"]),
            layers=tuple(
                (decode_array(layer["w"]), decode_array(layer["b"])) for layer in document["layers"]
            ),
            cut=float(document["cut"]),
            info=dict(document.get("info", {})),
            cosine_weight=float(document.get("cosine_weight", 0.0)),
        )

    def to_json(self) -> dict[str, Any]:
        """The document shipped in the package (a few tens of kB)."""
        return {
            "format": WEIGHTS_FORMAT,
            "model": self.model,
            "with_vectors": self.with_vectors,
            "features": list(SCALAR_FEATURES) + (["|a-b|", "a*b"] if self.with_vectors else []),
            "mean": encode_array(self.mean),
            "scale": encode_array(self.scale),
            "layers": [{"w": encode_array(w), "b": encode_array(b)} for w, b in self.layers],
            "cut": self.cut,
            "cosine_weight": self.cosine_weight,
            "info": self.info,
        }

    def probabilities(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """P(same question) for each feature row."""
        x = (rows - self.mean) / self.scale
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        logits = np.clip(x[:, 0] + self.cosine_weight * rows[:, 0], -40.0, 40.0)
        out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-logits))
        return out


@functools.cache
def load_network(model: str) -> Network:
    """The shipped verifier for embedding model ``model``.

    Raises:
        ValueError: no verifier ships for that model (use ``static`` mode).
    """
    path = weights_path(model)
    if not path.exists():
        raise ValueError(f"no cache verifier ships for embedding model {model!r}")
    network = Network.from_json(json.loads(path.read_text()))
    if network.model != model:
        raise ValueError(f"{path.name} was trained for {network.model!r}, not {model!r}")
    return network


# --- per-entry state (adaptive mode) -----------------------------------------

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


# --- the decision -------------------------------------------------------------


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
            Pass it to :func:`observe`.
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
