"""MemoEmbedder: the same rows as the model, with each recent text embedded once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.common.embeddings import (
    MEMO_MAX_CHARS,
    Embedder,
    MemoEmbedder,
    Vectors,
    load_embedder,
)


class _Counting:
    """The real model, counting the texts that reach it."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.seen: list[str] = []

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.seen.extend(texts)
        return self.inner.embed(texts)


def _model() -> Embedder:
    shared = load_embedder("wordllama")
    assert isinstance(shared, MemoEmbedder)
    return shared.inner


def test_rows_are_the_models_and_each_text_is_embedded_once() -> None:
    model = _model()
    counting = _Counting(model)
    memo = MemoEmbedder(counting)
    texts = ["What is the capital of France?", "capital", "What is the capital of France?"]
    first = memo.embed(texts)
    np.testing.assert_array_equal(first, model.embed(texts))
    assert counting.seen == ["What is the capital of France?", "capital"]
    again = memo.embed(["capital", "Paris"])
    np.testing.assert_array_equal(again, model.embed(["capital", "Paris"]))
    assert counting.seen[2:] == ["Paris"]
    assert memo.embed([]).shape == (0, model.dim)


def test_the_oldest_texts_are_forgotten_and_long_texts_never_kept() -> None:
    counting = _Counting(_model())
    memo = MemoEmbedder(counting, entries=2)
    memo.embed(["one", "two", "three"])  # "one" falls out
    memo.embed(["two", "three"])
    assert counting.seen == ["one", "two", "three"]
    memo.embed(["one"])
    assert counting.seen[-1] == "one"
    long_text = "word " * (MEMO_MAX_CHARS // 5 + 1)
    memo.embed([long_text])
    memo.embed([long_text])
    assert counting.seen[-2:] == [long_text, long_text]


def test_a_returned_row_changed_by_its_caller_does_not_change_the_memo() -> None:
    memo = MemoEmbedder(_model())
    row = memo.embed(["mutable"])
    expected = row.copy()
    row[:] = 0
    np.testing.assert_array_equal(memo.embed(["mutable"]), expected)
