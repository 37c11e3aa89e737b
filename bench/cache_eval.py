"""How often the semantic cache answers, and how often it answers wrongly, on QQP pairs.

For each pair of a QQP-format file (``text_a``, ``text_b``, ``label``: 1 when
the two questions are duplicates) the cache holds ``text_a`` and is asked
``text_b``, through the project's own code: the embedding model
(:mod:`services.common.embeddings`), the guards and the decision
(:mod:`services.cache.guards`, :mod:`services.cache.verifier`). Two tables:

* **Per pair** (the headline, and ``--json``'s figures): the lookup's only
  candidate is its own pair's ``text_a``, so every decision has a label. This
  is the protocol of the issue's reference figures.
* **Shared index**: every ``text_a`` is cached at once in one FAISS flat
  inner-product index (exact search over the L2-normalised vectors); each
  lookup judges its ``--neighbours`` nearest entries in order, as the semantic
  layer does, and serves the first accepted. A hit on another pair's question
  is right or wrong when the file labels that (entry, query) pair somewhere,
  and otherwise **unlabelled**: shown, and left out of precision and the
  wrong-answer rate (they are popular topics asked many ways, mostly true
  duplicates on inspection, but unknown).

Figures: hit rate = hits / lookups; precision = right hits / labelled hits;
recall = right hits / duplicate pairs; wrong-answer rate = labelled wrong hits
/ lookups; explore rate = explorations / lookups (adaptive mode only).

Policies, all from the same run: ``cosine only`` at several thresholds (the
baseline: the nearest entry's similarity alone, no guards), ``static+guards``
(the ``static`` mode: threshold and guards), ``verified`` (floor, guards and
the trained verifier) at several cuts, the shipped cut being the **default
setting**, and ``adaptive`` (vCache-style, wrong-answer bound ``delta``), which
takes the lookups as one stream in a fixed random order: an exploration calls
"the model" (here: reads the label) and teaches the entry (``observe``).

**Held-out split.** The verifier was trained on the pairs with
``pair_half == 0`` (``bench/train_cache_verifier.py``). This script evaluates
only the pairs with ``pair_half == 1`` of ``--data``, so given the whole dev
file it reports on the held-out half; ``--all`` evaluates every pair (for a
file the verifier never saw).

Latency (one lookup at a time, one thread, ``--timing`` lookups, on the
shared index): embedding of the query, the FAISS search, embedding + search,
and the decision over the candidates (guards and verifier).

    .venv/bin/python bench/cache_eval.py [--data FILE] [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_cache_verifier import DEFAULT_DATA, HELD_OUT, load_pairs  # noqa: E402
from services.cache import guards  # noqa: E402
from services.cache.adaptive import EntryState, observe  # noqa: E402
from services.cache.verifier import Mode, Policy, Verdict, Verifier  # noqa: E402
from services.cache.weights import load_network  # noqa: E402
from services.common.embeddings import DEFAULT_MODEL, load_embedder  # noqa: E402

STATIC_THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97)


@dataclasses.dataclass
class Tally:
    """Counts of one policy over the lookups."""

    name: str
    lookups: int = 0
    hits: int = 0
    right: int = 0
    unlabelled: int = 0
    explored: int = 0

    def row(self, duplicates: int) -> dict[str, Any]:
        """The figures of this policy."""
        return {
            "policy": self.name,
            "hit_rate": round(self.hits / max(1, self.lookups), 4),
            "precision": round(self.right / max(1, self.hits - self.unlabelled), 4),
            "recall": round(self.right / max(1, duplicates), 4),
            "wrong_answer_rate": round(
                (self.hits - self.right - self.unlabelled) / max(1, self.lookups), 4
            ),
            "explore_rate": round(self.explored / max(1, self.lookups), 4),
            "hits": self.hits,
            "unlabelled_hits": self.unlabelled,
        }


class Truth:
    """Whether serving an entry's question answers a query (from the file's labels)."""

    def __init__(self, labelled: Sequence[dict[str, Any]]) -> None:
        self._labels: dict[tuple[str, str], int] = {}
        for pair in labelled:
            self._labels[(pair["text_a"], pair["text_b"])] = pair["label"]
            self._labels[(pair["text_b"], pair["text_a"])] = pair["label"]

    def __call__(self, cached: str, query: str) -> bool | None:
        """True/False when known, None when the file does not label the pair."""
        if guards.normalise(cached).strip() == guards.normalise(query).strip():
            return True
        label = self._labels.get((cached, query))
        return None if label is None else label == 1


def _percentiles(samples: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.array(samples) * 1000.0, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


Candidates = list[list[tuple[float, int]]]  # per lookup: (cosine, cached index), nearest first


class Evaluation:
    """The policies of the table over one set of lookups and their candidates."""

    def __init__(
        self,
        queries: Sequence[str],
        cached: Sequence[str],
        candidates: Candidates,
        truth: Truth,
        verifier: Verifier,
    ) -> None:
        self.queries, self.cached, self.candidates = queries, cached, candidates
        self.truth, self.verifier = truth, verifier
        floor = verifier.policy.floor
        # The verifier's probability of every candidate that reaches the floor and
        # passes the guards, in one batch (the same decision as one at a time).
        keys = sorted(
            {
                (i, j)
                for i, found in enumerate(candidates)
                for s, j in found
                if s >= floor and not guards.hard_guards(queries[i], cached[j])
            }
        )
        scored = verifier.probabilities([(queries[i], cached[j]) for i, j in keys])
        self.probabilities = dict(zip(keys, (float(p) for p in scored), strict=True))

    def _serve(self, tally: Tally, i: int, j: int) -> None:
        tally.hits += 1
        right = self.truth(self.cached[j], self.queries[i])
        tally.right += bool(right)
        tally.unlabelled += right is None

    def cosine_only(self, threshold: float) -> Tally:
        """The classic baseline: serve the nearest entry when its cosine reaches
        ``threshold`` (no guards, no verifier)."""
        tally = Tally(f"cosine only >={threshold:g}")
        for i, found in enumerate(self.candidates):
            tally.lookups += 1
            if found and found[0][0] >= threshold:
                self._serve(tally, i, found[0][1])
        return tally

    def run(self, name: str, policy: Policy) -> Tally:
        """One policy over every lookup (adaptive: one stream in a fixed random order)."""
        judge = Verifier(policy, self.verifier.embedder)
        tally = Tally(name)
        order = list(range(len(self.queries)))
        random.Random(1).shuffle(order)
        rng = random.Random(0)
        states: dict[int, EntryState] = {}
        for i in order:
            tally.lookups += 1
            for s, j in self.candidates[i]:
                state = states.get(j, EntryState())
                decision = judge.decide(
                    self.queries[i],
                    self.cached[j],
                    s,
                    state=state,
                    rng=rng,
                    probability=self.probabilities.get((i, j)),
                )
                if decision.verdict is Verdict.HIT:
                    self._serve(tally, i, j)
                    states[j] = dataclasses.replace(state, hits=state.hits + 1)
                    break
                if decision.verdict is Verdict.EXPLORE:
                    # The gateway called the model; the file's label stands in for
                    # comparing its fresh answer with the cached one.
                    tally.explored += 1
                    assert decision.probability is not None
                    states[j] = observe(
                        dataclasses.replace(state, explorations=state.explorations + 1),
                        decision.probability,
                        bool(self.truth(self.cached[j], self.queries[i])),
                    )
                    break
        return tally

    def table(self, delta: float) -> tuple[list[Tally], str]:
        """Every policy of the table, and the name of the default setting."""
        base = self.verifier.policy
        tallies = [self.cosine_only(t) for t in STATIC_THRESHOLDS]
        for t in (0.9, Policy().threshold):
            static = dataclasses.replace(base, mode=Mode.STATIC, threshold=t)
            tallies.append(self.run(f"static+guards >={t:g}", static))
        shipped = load_network(base.model).cut
        default = f"verified cut={shipped:g} (default)"
        for cut in sorted({0.5, 0.6, 0.7, 0.8, shipped, 0.9}):
            name = default if cut == shipped else f"verified cut={cut:g}"
            tallies.append(self.run(name, dataclasses.replace(base, cut=cut)))
        for d in sorted({delta, 0.05}):
            adaptive = dataclasses.replace(base, mode=Mode.ADAPTIVE, delta=d)
            tallies.append(self.run(f"adaptive delta={d:g}", adaptive))
        return tallies, default


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    header = (
        f"{'policy':<32} {'hit rate':>8} {'precision':>9} {'recall':>7} {'wrong':>7}"
        f" {'explore':>7} {'unlabelled':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['policy']:<32} {r['hit_rate']:>8.3f} {r['precision']:>9.3f} {r['recall']:>7.3f}"
            f" {r['wrong_answer_rate']:>7.3f} {r['explore_rate']:>7.3f} {r['unlabelled_hits']:>10}"
        )
    print()


def main() -> None:
    """Runs the evaluation and prints the tables (or one JSON object)."""
    faiss.omp_set_num_threads(1)
    everything = load_pairs(ARGS.data, None)
    pairs = everything if ARGS.all else load_pairs(ARGS.data, HELD_OUT)
    if ARGS.limit:
        pairs = random.Random(0).sample(pairs, min(ARGS.limit, len(pairs)))
    truth = Truth(everything)
    embedder = load_embedder(ARGS.model)
    verifier = Verifier(Policy(model=ARGS.model, delta=ARGS.delta), embedder)
    duplicates = sum(p["label"] for p in pairs)
    queries = [p["text_b"] for p in pairs]
    cached = list(dict.fromkeys(p["text_a"] for p in pairs))
    position = {text: j for j, text in enumerate(cached)}
    cached_vectors = embedder.embed(cached)
    query_vectors = embedder.embed(queries)

    # Per pair: the cache holds the pair's own text_a (every decision labelled).
    own = [position[p["text_a"]] for p in pairs]
    per_pair: Candidates = [
        [(float(query_vectors[i] @ cached_vectors[j]), j)] for i, j in enumerate(own)
    ]
    pair_rows, default = Evaluation(queries, cached, per_pair, truth, verifier).table(ARGS.delta)

    # Shared: every text_a in one FAISS index; the nearest --neighbours are judged.
    index = faiss.IndexFlatIP(embedder.dim)
    index.add(cached_vectors)
    sims, ids = index.search(query_vectors, ARGS.neighbours)
    shared: Candidates = [
        [(float(s), int(j)) for s, j in zip(sims[i], ids[i], strict=True) if j >= 0]
        for i in range(len(pairs))
    ]
    shared_rows, _ = Evaluation(queries, cached, shared, truth, verifier).table(ARGS.delta)

    # Latency: one lookup at a time through the calls the cache makes.
    embed_t, search_t, both_t, verify_t = [], [], [], []
    for i in random.Random(2).sample(range(len(pairs)), min(ARGS.timing, len(pairs))):
        t0 = time.perf_counter()
        vector = embedder.embed([queries[i]])
        t1 = time.perf_counter()
        found_s, found_j = index.search(vector, ARGS.neighbours)
        t2 = time.perf_counter()
        for s, j in zip(found_s[0], found_j[0], strict=True):
            if j >= 0 and verifier.decide(queries[i], cached[j], float(s)).hit:
                break
        t3 = time.perf_counter()
        embed_t.append(t1 - t0)
        search_t.append(t2 - t1)
        both_t.append(t2 - t0)
        verify_t.append(t3 - t2)
    latency = {
        "embed": _percentiles(embed_t),
        "search": _percentiles(search_t),
        "embed_plus_search": _percentiles(both_t),
        "verify": _percentiles(verify_t),
    }
    pair_table = [t.row(duplicates) for t in pair_rows]
    shared_table = [t.row(duplicates) for t in shared_rows]
    headline = next(r for r in pair_table if r["policy"] == default)
    summary = {
        "data": str(ARGS.data),
        "split": "all pairs" if ARGS.all else "held-out half (pair_half == 1)",
        "pairs": len(pairs),
        "duplicates": duplicates,
        "cached_entries": len(cached),
        "model": ARGS.model,
        **headline,
        "latency": latency,
        "per_pair": pair_table,
        "shared_index": {"neighbours": ARGS.neighbours, "policies": shared_table},
    }
    if ARGS.json:
        print(json.dumps(summary))
        return
    print(
        f"{len(pairs)} pairs ({summary['split']}), {duplicates} duplicates, "
        f"{len(cached)} distinct cached questions, model {ARGS.model}\n"
    )
    _print_table("Per pair (the cache holds the pair's own text_a):", pair_table)
    _print_table(
        f"Shared index (all {len(cached)} text_a cached, {ARGS.neighbours} neighbours judged;"
        " precision over labelled hits):",
        shared_table,
    )
    print(f"latency per lookup ({len(embed_t)} lookups, one at a time, one thread):")
    for name, figures in latency.items():
        print(f"  {name:<18} p50 {figures['p50_ms']:7.3f} ms   p99 {figures['p99_ms']:7.3f} ms")
    goal = headline["precision"] >= 0.9 and headline["recall"] >= 0.5
    fast = latency["embed_plus_search"]["p50_ms"] < 5
    print(
        f"\ngoal at the default ({default}): precision >= 0.90 with recall >= 0.50: "
        f"{'met' if goal else 'NOT met'}; embed+search p50 < 5 ms: {'met' if fast else 'NOT met'}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Semantic-cache quality on QQP-format pairs: for each pair cache text_a, "
        "look up text_b. Evaluates only the held-out half of --data (pair_half == 1, a hash "
        "of the pair; the verifier was trained on the other half) unless --all.",
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help=f"QQP-format JSONL (default {DEFAULT_DATA})"
    )
    parser.add_argument(
        "--all", action="store_true", help="evaluate every pair, not just the held-out half"
    )
    parser.add_argument("--limit", type=int, default=0, help="evaluate a random N of the pairs")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedding model")
    parser.add_argument("--neighbours", type=int, default=4, help="candidates judged per lookup")
    parser.add_argument("--delta", type=float, default=0.02, help="adaptive wrong-answer bound")
    parser.add_argument("--timing", type=int, default=1000, help="lookups timed one at a time")
    parser.add_argument(
        "--json", action="store_true", help="print the default setting's figures as one JSON object"
    )
    return parser


if __name__ == "__main__":
    ARGS = _parser().parse_args()
    main()
