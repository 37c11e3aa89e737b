"""The verifier's trained network and the weights it ships with.

A :class:`Network` (one hidden layer, numpy at run time) reads the
:mod:`services.cache.features` of a pair and gives the probability that the
cached prompt asks the same question. It was trained by
``bench/train_cache_verifier.py`` on one half of the QQP dev pairs (split by a
hash of the pair) and ships as ``verifier_<model>.json`` next to this module
(``verifier_wordllama.json``); the other half is ``bench/cache_eval.py``'s
held-out test.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.cache.features import SCALAR_FEATURES

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
