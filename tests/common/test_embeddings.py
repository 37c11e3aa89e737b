"""The packaged embedding models (services/common/embeddings.py)."""

from __future__ import annotations

import numpy as np
import pytest

from services.common import embeddings
from services.common.embeddings import load_embedder

TEXTS = [
    "How can I learn Python quickly?",
    "What is the fastest way to learn Python?",
    "What is the boiling point of water at sea level?",
]


def test_wordllama_rows_are_unit_float32_of_its_dimension() -> None:
    embedder = load_embedder("wordllama")
    vectors = embedder.embed(TEXTS)
    assert embedder.name == "wordllama"
    assert vectors.shape == (3, embedder.dim) == (3, 256)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embeddings_are_deterministic_and_independent_of_the_batch() -> None:
    embedder = load_embedder("wordllama")
    batch = embedder.embed(TEXTS)
    assert np.array_equal(batch, embedder.embed(TEXTS))
    for i, text in enumerate(TEXTS):
        assert np.allclose(embedder.embed([text])[0], batch[i], atol=1e-6)


def test_a_paraphrase_is_nearer_than_another_question() -> None:
    a, b, c = load_embedder("wordllama").embed(TEXTS)
    assert float(a @ b) > float(a @ c) + 0.2


def test_empty_input_and_text_without_tokens() -> None:
    embedder = load_embedder("wordllama")
    assert embedder.embed([]).shape == (0, embedder.dim)
    row = embedder.embed([""])[0]
    assert not np.isnan(row).any()
    assert np.linalg.norm(row) in (0.0, pytest.approx(1.0))


def test_each_model_is_loaded_once() -> None:
    assert load_embedder("wordllama") is load_embedder("wordllama")
    assert load_embedder() is load_embedder(embeddings.DEFAULT_MODEL)


def test_an_unknown_model_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown embedding model 'nope'") as raised:
        load_embedder("nope")
    for name in embeddings.known_models():
        assert name in str(raised.value)
    assert "wordllama" in embeddings.known_models()
