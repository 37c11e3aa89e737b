"""Offline evaluation of the learned routing policy on logged outcomes.

Learns the router's policy from one file of logged outcomes and replays it on
another, next to random, always-weak, always-strong and oracle routing:

    .venv/bin/python bench/routing_eval.py --train ../shared/data/routing/mmlu_dev.jsonl \\
        --eval ../shared/data/routing/mmlu_dev.jsonl [--json]

Data: one JSON object a line with ``id``, ``prompt``, ``weak_correct`` and
``strong_correct`` (the format of ../shared/data/routing/*.jsonl). When
``--train`` and ``--eval`` name the same file it is split in two by a hash of
each ``id`` (SHA-256, even: train, odd: eval), so no prompt is both learned
from and reported on.

What is learned, with the router's own code (services/router/features.py,
bandit.py, learning.py and policy.py, no separate model): the same features as in production (task
analysis + WordLlama embedding prefix), and for each of the two models ("weak",
"strong") the Bayesian linear regression of answer quality (1 = correct) that
SubmitFeedback feeds, trained on every train prompt (both answers are logged,
so both models learn from each). The catalog quality (the prior) of each model
is its accuracy on the train prompts.

Metrics (RouteLLM's, as in ../shared/data/README.md): for a policy sending a
share s of the eval prompts to the strong model, q(s) is the accuracy of the
chosen answers; PGR(s) = (q(s) - q_weak) / (q_strong - q_weak); APGR is the
mean PGR over s in [0, 1] (every share from 0 to n prompts); CPT(x%) is the
smallest s with PGR >= x%. The learned policy's curve comes from ranking the
eval prompts by its expected quality gain of the strong model over the weak one
(posterior means): the order in which raising the tenant's quality weight
against its cost weight sends prompts to the strong model. Random routing is
taken in expectation (q(s) linear in s). The learned policy's "share" and
"accuracy" columns are one operating point, chosen on the train file only: the
balanced weights at which, by 2-fold cross-validation on the train prompts,
the policy recovers 80% of the gap; each eval prompt is then routed by
``policy.decide`` itself with those weights and the two models' real list
prices (Mixtral-8x7B 0.6/0.6, gpt-4-1106-preview 10/30 USD per million
tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestra.budget.v1 import account_service_pb2 as account_pb2  # noqa: E402
from orchestra.common.v1 import chat_pb2, identity_pb2  # noqa: E402
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2  # noqa: E402
from orchestra.router.v1 import chat_service_pb2 as chat_api  # noqa: E402
from services.router import learning, policy, tasks  # noqa: E402

TENANT = "eval"
WEAK, STRONG = "weak", "strong"
TARGET_PGR = 0.8
# USD per million tokens (input, output), as listed when the logs were made.
PRICES = {WEAK: (0.6, 0.6), STRONG: (10.0, 30.0)}
MAX_TOKENS = 256
TTFT_MS = 500  # the same for both: speed does not decide


def _load(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _half(row_id: str) -> int:
    return int(hashlib.sha256(row_id.encode()).hexdigest(), 16) % 2


def _outcomes(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    weak = np.asarray([bool(r["weak_correct"]) for r in rows], dtype=np.float64)
    strong = np.asarray([bool(r["strong_correct"]) for r in rows], dtype=np.float64)
    return weak, strong


def curve(order: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Accuracy when the first k prompts of ``order`` go to strong, k = 0..n."""
    gains = (strong - weak)[order]
    return (weak.sum() + np.concatenate([[0.0], np.cumsum(gains)])) / len(weak)


def metrics(accuracy: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> dict[str, float]:
    """APGR and CPT(50%)/CPT(80%) of an accuracy curve over shares 0..1."""
    gap = strong.mean() - weak.mean()
    pgr = (accuracy - weak.mean()) / gap
    shares = np.linspace(0.0, 1.0, len(accuracy))

    def cpt(x: float) -> float:
        reached = np.nonzero(pgr >= x - 1e-12)[0]
        return float(shares[reached[0]]) if len(reached) else 1.0

    return {"apgr": float(pgr.mean()), "cpt50": cpt(0.5), "cpt80": cpt(0.8)}


def _features(learner: learning.Learner, rows: Sequence[dict[str, Any]]) -> np.ndarray:
    analyses = [tasks.analyze(r["prompt"]) for r in rows]
    return learner.featurize.many([r["prompt"] for r in rows], analyses)


def _train(
    learner: learning.Learner, xs: np.ndarray, weak: np.ndarray, strong: np.ndarray
) -> tuple[float, float]:
    priors = (float(weak.mean()), float(strong.mean()))
    learner.train(TENANT, WEAK, xs, weak, priors[0])
    learner.train(TENANT, STRONG, xs, strong, priors[1])
    return priors


def _gains(learner: learning.Learner, xs: np.ndarray, priors: tuple[float, float]) -> np.ndarray:
    """Expected quality gain of strong over weak for each row (posterior means)."""
    out = np.empty(len(xs))
    for i, x in enumerate(xs):
        est = learner.estimates(TENANT, x, [(WEAK, priors[0]), (STRONG, priors[1])])
        out[i] = est[STRONG].expected_quality() - est[WEAK].expected_quality()
    return out


def _calibrate(xs: np.ndarray, weak: np.ndarray, strong: np.ndarray, ids: Sequence[str]) -> float:
    """The gain threshold reaching TARGET_PGR out of fold on the train prompts."""
    fold = np.asarray([int(hashlib.sha256(f"cv:{i}".encode()).hexdigest(), 16) % 2 for i in ids])
    gains = np.empty(len(xs))
    for k in (0, 1):
        learner = learning.Learner(None, seed=0)
        priors = _train(learner, xs[fold != k], weak[fold != k], strong[fold != k])
        gains[fold == k] = _gains(learner, xs[fold == k], priors)
    order = np.argsort(-gains, kind="stable")
    pgr = (curve(order, weak, strong) - weak.mean()) / (strong.mean() - weak.mean())
    k = int(np.nonzero(pgr >= TARGET_PGR)[0][0])
    return float(gains[order[k - 1]]) if k else float(gains.max() + 1.0)


def _model(name: str) -> discovery_pb2.Model:
    price_in, price_out = PRICES[name]
    return discovery_pb2.Model(
        name=name,  # the arm names the learner was trained under
        provider_id="eval",
        model_id=name,
        context_window=1_000_000,
        pricing=discovery_pb2.Pricing(
            input_micro_usd_per_mtok=int(price_in * 1e6),
            output_micro_usd_per_mtok=int(price_out * 1e6),
        ),
        price_source=discovery_pb2.PRICE_SOURCE_CATALOG,
        health=discovery_pb2.Health(ttft_p50_ms=TTFT_MS),
    )


def _decide_all(
    learner: learning.Learner,
    rows: Sequence[dict[str, Any]],
    priors: tuple[float, float],
    threshold: float,
) -> np.ndarray:
    """Routes each row with policy.decide at the calibrated weights; True = strong."""
    models = [_model(WEAK), _model(STRONG)]
    models[0].quality, models[1].quality = priors
    # Strong costs nothing "cheapness"; weak's cheapness is 1 - its cost share.
    sample = _request(rows[0]["prompt"])
    from services.router import cost

    tokens = cost.estimate_prompt_tokens(sample.messages, [])
    worst = [cost.worst_case_micro_usd(tokens, MAX_TOKENS, m.pricing) for m in models]
    cheapness_gap = 1.0 - worst[0] / worst[1]
    weights = account_pb2.BalancedWeights(quality=1.0, cost=max(threshold, 1e-6) / cheapness_gap)
    tenant_policy = account_pb2.TenantPolicy(
        routing_strategy=identity_pb2.ROUTING_STRATEGY_BALANCED,
        balanced_weights=weights,
        max_exploration_rate=1e-9,  # replay the best estimate, never explore
    )
    chosen = np.empty(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        decision = policy.decide(
            _request(row["prompt"]),
            models,
            tenant_policy,
            default_max_tokens=MAX_TOKENS,
            tenant_id=TENANT,
            learner=learner,
        )
        chosen[i] = decision.model.model_id == STRONG
    return chosen


def _request(prompt: str) -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=prompt)])
        ]
    )


def evaluate(train_path: Path, eval_path: Path) -> dict[str, Any]:
    """Runs the evaluation; returns the results as one JSON-able object."""
    train_rows = _load(train_path)
    eval_rows = _load(eval_path)
    split = train_path.resolve() == eval_path.resolve()
    if split:
        train_rows = [r for r in train_rows if _half(r["id"]) == 0]
        eval_rows = [r for r in eval_rows if _half(r["id"]) == 1]
    learner = learning.Learner(None, seed=0)
    x_train = _features(learner, train_rows)
    w_train, s_train = _outcomes(train_rows)
    threshold = _calibrate(x_train, w_train, s_train, [r["id"] for r in train_rows])
    priors = _train(learner, x_train, w_train, s_train)

    x_eval = _features(learner, eval_rows)
    weak, strong = _outcomes(eval_rows)
    n = len(eval_rows)
    gains = _gains(learner, x_eval, priors)
    learned_curve = curve(np.argsort(-gains, kind="stable"), weak, strong)
    chosen = _decide_all(learner, eval_rows, priors, threshold)
    learned_point = (float(chosen.mean()), float(np.where(chosen, strong, weak).mean()))

    shares = np.linspace(0.0, 1.0, n + 1)
    random_curve = (1 - shares) * weak.mean() + shares * strong.mean()
    oracle_order = np.argsort(-(strong - weak), kind="stable")
    oracle_curve = curve(oracle_order, weak, strong)
    oracle_share = float(((strong == 1) & (weak == 0)).mean())
    na = {"apgr": None, "cpt50": None, "cpt80": None}
    policies = {
        "learned (this router)": {
            "strong_share": learned_point[0],
            "accuracy": learned_point[1],
            **metrics(learned_curve, weak, strong),
        },
        "random": {
            "strong_share": 0.5,
            "accuracy": float(random_curve[n // 2]),
            **metrics(random_curve, weak, strong),
        },
        "always weak": {"strong_share": 0.0, "accuracy": float(weak.mean()), **na},
        "always strong": {"strong_share": 1.0, "accuracy": float(strong.mean()), **na},
        "oracle": {
            "strong_share": oracle_share,
            "accuracy": float(np.maximum(weak, strong).mean()),
            **metrics(oracle_curve, weak, strong),
        },
    }
    return {
        "train": str(train_path),
        "eval": str(eval_path),
        "split_by_id_hash": split,
        "train_prompts": len(train_rows),
        "eval_prompts": n,
        "weak_accuracy": float(weak.mean()),
        "strong_accuracy": float(strong.mean()),
        "operating_point": {
            "target_pgr_on_train": TARGET_PGR,
            "quality_gain_threshold": threshold,
        },
        "policies": policies,
    }


def _table(result: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:5.1f}%"

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    how = "halves split by id hash" if result["split_by_id_hash"] else "separate files"
    lines = [
        f"train {result['train']} ({result['train_prompts']} prompts) -> "
        f"eval {result['eval']} ({result['eval_prompts']} prompts), {how}",
        f"eval accuracy: weak {result['weak_accuracy']:.3f}, "
        f"strong {result['strong_accuracy']:.3f}",
        "",
        f"{'policy':<22} {'strong calls':>12} {'accuracy':>9} {'APGR':>6} "
        f"{'CPT(50%)':>9} {'CPT(80%)':>9}",
    ]
    for name, p in result["policies"].items():
        lines.append(
            f"{name:<22} {pct(p['strong_share']):>12} {p['accuracy']:>9.3f} "
            f"{num(p['apgr']):>6} {pct(p['cpt50']):>9} {pct(p['cpt80']):>9}"
        )
    lines.append("")
    lines.append(
        "strong calls / accuracy of the learned policy: policy.decide with the balanced "
        f"weights that reach PGR {TARGET_PGR:.0%} on the train prompts (2-fold CV)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Learn the router's policy from logged outcomes (--train) and replay "
        "it on others (--eval): share of strong calls, accuracy, APGR, CPT(50%%), CPT(80%%) "
        "next to random, always-weak, always-strong and oracle routing. The same file "
        "for both is split in two by a hash of each id."
    )
    parser.add_argument("--train", type=Path, required=True, help="JSONL of logged outcomes")
    parser.add_argument("--eval", type=Path, required=True, help="JSONL to replay on")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for path in (args.train, args.eval):
        if not path.is_file():
            parser.error(f"{path}: no such file")
    result = evaluate(args.train, args.eval)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
