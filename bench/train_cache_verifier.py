"""Trains the semantic cache's verifier and writes the weights the package ships.

The verifier (:mod:`services.cache.verifier`) is a one-hidden-layer network over
cheap features of a (query, cached prompt) pair. This script trains it on the
**training half** of a QQP-format file (``text_a``, ``text_b``, ``label``), the
half chosen by :func:`pair_half` (a hash of the pair, so the split is the same
on every machine and never depends on file order). ``bench/cache_eval.py``
reports on the other half only.

Steps: features of every training pair (both directions, since either text
may be the cached one); the training half is cut again, 80% to fit the network
(scikit-learn's ``MLPClassifier``) and 20% to calibrate it (a logistic fit on
its logit and the cosine, folded into the output layer and a cosine weight, so
the shipped network gives calibrated probabilities) and to choose ``cut``: the lowest probability at
which the whole decision (floor, guards, verifier) reaches ``--precision`` on
that 20%. The data itself is never written out; only the weights (about 90 kB
of JSON).

scikit-learn is needed here only, never at run time (the runtime is numpy)::

    .venv/bin/pip install scikit-learn   # or any venv with the project's deps
    .venv/bin/python bench/train_cache_verifier.py [--data FILE] [--model wordllama]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.cache import guards  # noqa: E402
from services.cache.features import pair_features  # noqa: E402
from services.cache.verifier import Policy  # noqa: E402
from services.cache.weights import Network, weights_path  # noqa: E402
from services.common.embeddings import load_embedder  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "qqp" / "dev.jsonl"
TRAIN, HELD_OUT = 0, 1


def pair_half(text_a: str, text_b: str) -> int:
    """Which half a pair belongs to: 0 trains the verifier, 1 is held out."""
    digest = hashlib.sha256(f"{text_a}\x1f{text_b}".encode()).hexdigest()
    return int(digest[:8], 16) % 2


def load_pairs(path: Path, half: int | None) -> list[dict[str, Any]]:
    """The pairs of a QQP-format JSONL file, only those of ``half`` unless None."""
    pairs = []
    with path.open() as lines:
        for line in lines:
            if line.strip():
                pair = json.loads(line)
                if half is None or pair_half(pair["text_a"], pair["text_b"]) == half:
                    pairs.append(pair)
    return pairs


def choose_cut(
    probability: npt.NDArray[np.float64], eligible: npt.NDArray[np.bool_], label: npt.NDArray[Any]
) -> tuple[float, float, float]:
    """The lowest cut whose hits reach the target precision: (cut, precision, recall)."""
    order = np.argsort(-np.where(eligible, probability, -1.0))
    hits = np.cumsum(eligible[order])
    right = np.cumsum(eligible[order] & (label[order] == 1))
    precision = right / np.maximum(hits, 1)
    ok = np.nonzero((precision >= ARGS.precision) & (hits >= 20))[0]
    i = int(ok.max()) if len(ok) else 0
    return float(probability[order][i]), float(precision[i]), float(right[i] / max(1, label.sum()))


def main() -> None:
    """Trains and writes the weights."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        raise SystemExit(
            "training needs scikit-learn (never the runtime): .venv/bin/pip install scikit-learn"
        ) from None

    pairs = load_pairs(ARGS.data, TRAIN)
    embedder = load_embedder(ARGS.model)
    policy = Policy(model=ARGS.model)
    rng = np.random.default_rng(0)
    calibrate = rng.random(len(pairs)) < 0.2
    started = time.perf_counter()
    # Lookups go text_b -> cached text_a; both directions are trained.
    forward = pair_features(
        [(p["text_b"], p["text_a"]) for p in pairs], embedder, with_vectors=True
    )
    backward = pair_features(
        [(p["text_a"], p["text_b"]) for p in pairs], embedder, with_vectors=True
    )
    label = np.array([p["label"] for p in pairs])
    print(f"features of {len(pairs)} pairs x2 in {time.perf_counter() - started:.1f} s")

    fit_rows = np.vstack([forward[~calibrate], backward[~calibrate]])
    fit_label = np.concatenate([label[~calibrate], label[~calibrate]])
    mean = fit_rows.mean(axis=0)
    scale = fit_rows.std(axis=0) + 1e-6
    mlp = MLPClassifier(
        hidden_layer_sizes=(ARGS.hidden,),
        alpha=ARGS.alpha,
        max_iter=300,
        early_stopping=True,
        random_state=0,
    )
    mlp.fit((fit_rows - mean) / scale, fit_label)
    raw = Network(
        model=ARGS.model,
        with_vectors=True,
        mean=mean,
        scale=scale,
        layers=tuple(
            (w.astype(np.float64), b.astype(np.float64))
            for w, b in zip(mlp.coefs_, mlp.intercepts_, strict=True)
        ),
        cut=0.5,
        info={},
    )
    # Calibration on the held-back 20%: a logistic fit on (network logit, cosine),
    # folded into the output layer and the cosine weight.
    p_cal = np.clip(raw.probabilities(forward[calibrate]), 1e-6, 1 - 1e-6)
    inputs = np.column_stack([np.log(p_cal / (1 - p_cal)), forward[calibrate][:, 0]])
    platt = LogisticRegression(C=100.0).fit(inputs, label[calibrate])
    a, s = (float(v) for v in platt.coef_[0])
    c = float(platt.intercept_[0])
    (w_out, b_out) = raw.layers[-1]
    layers = (*raw.layers[:-1], (w_out * a, b_out * a + c))
    network = Network(raw.model, True, mean, scale, layers, 0.5, {}, cosine_weight=s)

    cal_pairs = [p for p, c_ in zip(pairs, calibrate, strict=True) if c_]
    probability = network.probabilities(forward[calibrate])
    cosine = forward[calibrate][:, 0]
    eligible = np.array(
        [
            cos >= policy.floor and not guards.hard_guards(p["text_b"], p["text_a"])
            for cos, p in zip(cosine, cal_pairs, strict=True)
        ]
    )
    cut, precision, recall = choose_cut(probability, eligible, label[calibrate])
    bins = np.clip((probability * 10).astype(int), 0, 9)
    calibration = [
        [
            round(float(probability[bins == k].mean()), 3),
            round(float(label[calibrate][bins == k].mean()), 3),
        ]
        for k in range(10)
        if (bins == k).sum() >= 20
    ]
    info = {
        "data": f"{ARGS.data.name}, training half (pair_half == 0)",
        "pairs": len(pairs),
        "fit_pairs": int((~calibrate).sum()),
        "calibration_pairs": int(calibrate.sum()),
        "hidden": ARGS.hidden,
        "alpha": ARGS.alpha,
        "target_precision": ARGS.precision,
        "cut_precision_on_calibration": round(precision, 4),
        "cut_recall_on_calibration": round(recall, 4),
        "calibration_mean_predicted_vs_observed": calibration,
        "trainer": "bench/train_cache_verifier.py",
    }
    shipped = dataclasses.replace(network, cut=round(cut, 4), info=info)
    out = ARGS.out or weights_path(ARGS.model)
    out.write_text(json.dumps(shipped.to_json(), indent=1) + "\n")
    print(f"cut {cut:.4f}: precision {precision:.3f}, recall {recall:.3f} on the calibration pairs")
    print(f"calibration (predicted, observed) by decile: {calibration}")
    print(f"wrote {out} ({out.stat().st_size // 1024} kB)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP-format JSONL file")
    parser.add_argument("--model", default="wordllama", help="embedding model (default wordllama)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    parser.add_argument("--alpha", type=float, default=1e-2, help="L2 penalty (default 0.01)")
    parser.add_argument(
        "--precision", type=float, default=0.9, help="precision the cut must reach (default 0.9)"
    )
    parser.add_argument("--out", type=Path, help="where to write (default: the shipped file)")
    return parser


if __name__ == "__main__":
    ARGS = _parser().parse_args()
    main()
