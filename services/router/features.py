"""The learned policy's view of a prompt: one fixed-length feature vector.

The features (:data:`FEATURE_DIM` numbers) are, in order:

* the task analysis (:mod:`services.router.tasks`: one-hot task type,
  complexity, length, numbers, ...);
* the first :data:`EMBEDDING_DIMS` dimensions of the prompt's WordLlama
  embedding (Matryoshka-trained, so a prefix is itself an embedding),
  renormalised and scaled by :data:`EMBEDDING_SCALE`;
* the prompt's words hashed into :data:`WORD_BUCKETS` buckets (present or not,
  normalised, scaled by :data:`WORD_SCALE`: they pick up subject and difficulty
  words the small embedding blurs);
* a constant 1.

The sizes and scales were chosen by cross-validation on the train half of the
routing data only. Change any of them and bump :data:`FEATURE_VERSION`, so
learned state of the old layout is ignored rather than misread.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from services.common.embeddings import Embedder, load_embedder
from services.router import tasks

EMBEDDING_MODEL = "wordllama"
EMBEDDING_DIMS = 64
EMBEDDING_SCALE = 0.35
EMBED_MAX_CHARS = 2_000
WORD_BUCKETS = 128
WORD_SCALE = 0.5
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
