"""The features of a (query, cached prompt) pair that the verifier reads.

One definition, used at run time (:mod:`services.cache.verifier`) and by the
trainer (``bench/train_cache_verifier.py``): the cosine and its square; word
and content-word Jaccard overlap; length ratio and gap; the guard flags
(numbers differ, a number on one side only, negation, names); whether the
question words differ ("how" / "why"); the share of content words of each side
absent from the other; how many content words have no partner in the other
text at word-vector cosine 0.8, and the mean and worst best-partner cosine; and
the element-wise ``|a - b|`` and ``a * b`` of the two sentence vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from services.cache import guards
from services.common.embeddings import Embedder

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
