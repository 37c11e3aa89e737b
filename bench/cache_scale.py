"""The semantic cache's search at scale: lookup latency and memory at 10k, 100k, 1M entries.

It measures the real index class of the cache (``services.cache.scope_index.ScopeIndex``)
holding one scope of N entries, both ways the cache can hold it: exact
(``IndexFlatIP``, the baseline: it always finds the true nearest neighbour) and
HNSW (``IndexHNSWFlat``, M=32, efSearch=128). For each size it prints the search
p50/p99 (embedding excluded), the lookup p50/p99 with the query's embedding
included, HNSW's recall@1 against the exact search of the same queries (the
share of queries where HNSW's nearest is as similar as the true nearest), and the
memory the index holds (its serialised FAISS size) and the growth of this
process's RSS while building it (FAISS plus the per-entry Python bookkeeping;
allocator reuse makes this rough for small sizes).

The vectors are real: the questions of a QQP-format file (``--data``, default
../shared/data/qqp/dev.jsonl) embedded by the configured model. Sizes larger
than the number of distinct questions are filled with perturbed copies of them
(each a real vector plus Gaussian noise, renormalised), which keeps the
clustered shape of real embeddings that random vectors lack. The queries are
held-out questions, so each lookup is a real near-miss search.

    .venv/bin/python bench/cache_scale.py [--sizes 10000,100000,1000000]
        [--queries 2000] [--model wordllama] [--data FILE] [--json]

Search runs on one thread (``faiss.omp_set_num_threads(1)``): a replica serves
many lookups at once, so one lookup should not take every core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.cache.scope_index import ScopeIndex  # noqa: E402
from services.cache.semantic import NEIGHBOURS  # noqa: E402
from services.common.embeddings import load_embedder  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "qqp" / "dev.jsonl"
NOISE = 0.15  # std of the perturbation of synthetic copies, per unit vector


def _questions(path: Path) -> list[str]:
    seen: dict[str, None] = {}
    with path.open() as lines:
        for line in lines:
            pair = json.loads(line)
            seen.setdefault(pair["text_a"], None)
            seen.setdefault(pair["text_b"], None)
    return list(seen)


def _vectors(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= len(base):
        return base[:n]
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    out[: len(base)] = base
    for start in range(len(base), n, 100_000):
        stop = min(n, start + 100_000)
        picks = base[rng.integers(0, len(base), stop - start)]
        noisy = picks + rng.normal(0, NOISE / np.sqrt(base.shape[1]), picks.shape)
        out[start:stop] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out


def _percentiles(samples_us: list[float]) -> tuple[float, float]:
    data = np.asarray(samples_us)
    return float(np.percentile(data, 50)) / 1000, float(np.percentile(data, 99)) / 1000


def _measure(
    vectors: np.ndarray,
    hnsw: bool,
    query_texts: list[str],
    query_vectors: np.ndarray,
    embed: Any,
) -> dict[str, Any]:
    rss = psutil.Process().memory_info().rss
    index = ScopeIndex(vectors.shape[1], hnsw_from=1 if hnsw else 2**62)
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building may use every core
    started = time.perf_counter()
    n = len(vectors)
    ids = [f"{i:064x}" for i in range(n)]
    for start in range(0, n, 50_000):
        stop = min(n, start + 50_000)
        index.extend(
            ids[start:stop], [""] * (stop - start), vectors[start:stop], [0] * (stop - start)
        )
    build_s = time.perf_counter() - started
    faiss.omp_set_num_threads(1)
    memory_mb = (psutil.Process().memory_info().rss - rss) / 2**20
    index_mb = len(faiss.serialize_index(index.faiss_index)) / 2**20
    search_us, lookup_us, nearest = [], [], []
    for text, vector in zip(query_texts, query_vectors, strict=True):
        t0 = time.perf_counter_ns()
        found = index.search(vector, NEIGHBOURS, 0)
        search_us.append((time.perf_counter_ns() - t0) / 1000)
        t0 = time.perf_counter_ns()
        index.search(embed(text), NEIGHBOURS, 0)
        lookup_us.append((time.perf_counter_ns() - t0) / 1000)
        nearest.append(found[0][0] if found else -1.0)
    search = _percentiles(search_us)
    lookup = _percentiles(lookup_us)
    return {
        "entries": n,
        "index": "hnsw" if hnsw else "exact",
        "build_s": round(build_s, 2),
        "index_mb": round(index_mb, 1),
        "rss_growth_mb": round(memory_mb, 1),
        "search_p50_ms": round(search[0], 3),
        "search_p99_ms": round(search[1], 3),
        "lookup_p50_ms": round(lookup[0], 3),
        "lookup_p99_ms": round(lookup[1], 3),
        "nearest": nearest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--model", default="wordllama", help="embedding model")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP-format JSONL")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"no data at {args.data}: pass --data FILE (QQP format: text_a, text_b, label)")
    rng = np.random.default_rng(7)
    embedder = load_embedder(args.model)

    def embed(text: str) -> np.ndarray:
        return np.ascontiguousarray(embedder.embed([text])[0])

    questions = _questions(args.data)
    rng.shuffle(questions)
    query_texts, corpus = questions[: args.queries], questions[args.queries :]
    base = np.vstack([embedder.embed(corpus[i : i + 4096]) for i in range(0, len(corpus), 4096)])
    query_vectors = embedder.embed(query_texts)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        vectors = _vectors(base, size, rng)
        exact = _measure(vectors, False, query_texts, query_vectors, embed)
        hnsw = _measure(vectors, True, query_texts, query_vectors, embed)
        # A hit for HNSW: it found a neighbour as close as the true nearest one
        # (ties among near-identical entries make the id itself arbitrary).
        agree = sum(
            h >= e - 1e-4 for e, h in zip(exact.pop("nearest"), hnsw.pop("nearest"), strict=True)
        )
        hnsw["recall_at_1"] = round(agree / len(query_texts), 4)
        exact["recall_at_1"] = 1.0
        rows += [exact, hnsw]
        del vectors
    print(
        f"semantic cache search, one scope, {embedder.name} ({embedder.dim}-d), "
        f"{len(query_texts)} held-out queries, {os.cpu_count()} cores, 1 search thread"
    )
    print(
        "| entries | index | build s | index MB | RSS growth MB | search p50 ms | search p99 ms "
        "| with embedding p50 ms | p99 ms | recall@1 vs exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['entries']:,} | {r['index']} | {r['build_s']} | {r['index_mb']} "
            f"| {r['rss_growth_mb']} "
            f"| {r['search_p50_ms']} | {r['search_p99_ms']} | {r['lookup_p50_ms']} "
            f"| {r['lookup_p99_ms']} | {r['recall_at_1']} |"
        )
    if args.json:
        print(json.dumps({"model": embedder.name, "rows": rows}))


if __name__ == "__main__":
    main()
