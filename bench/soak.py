"""Soak: steady chat load through the edge for a set time, and each process's memory.

A real ``orchestra up --no-local-model`` (:class:`bench.suite.Suite`) with the
project's OpenAI-wire fake as its only provider. ``--concurrency`` clients send
streaming chats through Envoy without pause (:class:`bench.chaos.Traffic`:
unique prompts, cache misses, and every fourth one of five repeated prompts,
answered from the cache). After a warm-up, every ``--every`` seconds it reads
the resident memory (``/proc/<pid>/statm``) and CPU seconds (``/proc/<pid>/stat``)
of every process of the suite: the supervisor, each service replica, Envoy,
PostgreSQL (its backends summed) and Redis (not its BGSAVE fork, whose
copy-on-write pages are the parent's). At the end it stops the traffic,
waits for the outboxes to drain, samples once more and prints:

* per process: RSS at the start (after the warm-up) and at the end, the peak,
  the growth in MB, that growth per hour, the slope of a least-squares fit over
  the second half of the samples (near zero for a process that has settled,
  the leak rate for one that leaks), the growth of the PSS (``smaps_rollup``:
  shared pages divided among the processes mapping them, so PostgreSQL's shared
  buffers count once, not once per backend), and CPU ms per chat answered;
* the chats attempted, answered and failed (gRPC status / ``ErrorInfo``
  reason), for the warm-up and the soak.

``--csv PATH`` writes every sample (one row per process and sample). Exit
status 1 if any chat failed.

    .venv/bin/python bench/soak.py                 # 30 minutes, a sample every 30 s
    .venv/bin/python bench/soak.py --quick         # about a minute, a sample every 5 s
    .venv/bin/python bench/soak.py --minutes 10 --every 30 --csv /tmp/soak.csv
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.chaos import Chat, Traffic  # noqa: E402
from bench.overhead import CONFIG, KEY, MODEL  # noqa: E402
from bench.suite import (  # noqa: E402
    PARTS,
    Suite,
    cpu_delta,
    grid,
    proc_cpu,
    proc_pss,
    proc_rss,
    processes,
    start_fake_upstream,
    supervised,
    wait_idle_outbox,
)

MB = 1024 * 1024


@dataclasses.dataclass
class Sample:
    """One reading of every process of the suite."""

    at: float  # seconds since the soak began (after the warm-up)
    chats: int  # chats of the soak so far
    procs: dict[int, tuple[str, int, int, float]]  # pid -> (name, RSS, PSS bytes, CPU s)

    def rss(self, name: str) -> int:
        return sum(rss for n, rss, _, _ in self.procs.values() if n == name)

    def pss(self, name: str) -> int:
        return sum(pss for n, _, pss, _ in self.procs.values() if n == name)

    def count(self, name: str) -> int:
        return sum(n == name for n, *_ in self.procs.values())

    def cpu(self) -> dict[int, tuple[str, float]]:
        return {pid: (name, cpu) for pid, (name, _, _, cpu) in self.procs.items()}

    def names(self) -> set[str]:
        return {n for n, *_ in self.procs.values()}


def _names(suite: Suite) -> dict[int, str]:
    """pid -> the name a process is reported under (a replica's, or its part's)."""
    by_pid = {int(row["pid"]): name for name, row in supervised(suite.state_dir).items()}
    out = {suite.pid: "supervisor"}
    parts = processes(suite.pid)
    for pid, part in parts.items():
        if part == "redis" and parts.get(_parent(pid)) == "redis":
            continue  # a BGSAVE fork: the parent's pages, copy-on-write; they would count twice
        out[pid] = part if part == "postgres" else by_pid.get(pid, part)
    return out


def _parent(pid: int) -> int:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return 0


def _sample(suite: Suite, at: float, chats: int) -> Sample:
    procs: dict[int, tuple[str, int, int, float]] = {}
    for pid, name in _names(suite).items():
        try:
            procs[pid] = (name, proc_rss(pid), proc_pss(pid), proc_cpu(pid))
        except OSError:
            continue  # exited meanwhile (a PostgreSQL worker)
    return Sample(at, chats, procs)


async def run(suite: Suite, args: argparse.Namespace) -> tuple[list[Sample], list[Chat]]:
    """Warm-up, then the soak with a sample every ``args.every`` seconds, then the drain."""
    traffic = Traffic(suite.edge, args.concurrency)
    traffic.start()
    samples: list[Sample] = []
    try:
        await asyncio.sleep(args.warmup)
        traffic.fault = "soak"  # chats that end from now on count for the soak
        began = time.monotonic()
        samples.append(await asyncio.to_thread(_sample, suite, 0.0, 0))
        print(f"warm-up done ({len(traffic.chats)} chats); soaking", flush=True)
        duration = args.minutes * 60
        for k in range(1, int(duration // args.every) + 2):
            at = min(k * args.every, duration)
            await asyncio.sleep(max(0.0, began + at - time.monotonic()))
            chats = sum(c.fault == "soak" for c in traffic.chats)
            samples.append(await asyncio.to_thread(_sample, suite, at, chats))
            if at >= duration:
                break
    finally:
        await traffic.stop()
    await asyncio.to_thread(wait_idle_outbox, suite.redis_url, 120)
    await asyncio.sleep(1.0)  # the last deliveries' writes
    soaked = [c for c in traffic.chats if c.fault == "soak"]
    samples.append(await asyncio.to_thread(_sample, suite, time.monotonic() - began, len(soaked)))
    return samples, traffic.chats


def _order(name: str) -> tuple[int, str]:
    part = name.split("-")[0]
    return (PARTS.index(part) if part in PARTS else -1, name)


def _slope_mb_per_hour(samples: list[Sample], name: str) -> float:
    """Least-squares slope of RSS over the second half of the samples, MB per hour."""
    half = samples[len(samples) // 2 :]
    if len(half) < 2:
        return 0.0
    xs = [s.at / 3600 for s in half]
    ys = [s.rss(name) / MB for s in half]
    return statistics.linear_regression(xs, ys).slope


def memory_rows(samples: list[Sample], answered: int) -> list[dict[str, Any]]:
    """Per process: RSS start/end/peak/growth, MB per hour, CPU ms per answered chat."""
    first, last = samples[0], samples[-1]
    names = sorted(set().union(*(s.names() for s in samples)), key=_order)
    spent = cpu_delta(first.cpu(), last.cpu())
    hours = max(last.at, 1e-9) / 3600
    rows = []
    for name in names:
        start, end = first.rss(name) / MB, last.rss(name) / MB
        rows.append(
            {
                "process": name,
                "pids": last.count(name),
                "rss_start_mb": round(start, 1),
                "rss_end_mb": round(end, 1),
                "rss_peak_mb": round(max(s.rss(name) for s in samples) / MB, 1),
                "growth_mb": round(end - start, 1),
                "mb_per_hour": round((end - start) / hours, 1),
                "second_half_mb_per_hour": round(_slope_mb_per_hour(samples, name), 1),
                "pss_growth_mb": round((last.pss(name) - first.pss(name)) / MB, 1),
                "cpu_ms_per_chat": round(spent.get(name, 0.0) * 1000 / max(answered, 1), 2),
            }
        )
    return rows


def chat_rows(chats: list[Chat]) -> list[dict[str, Any]]:
    """Chats attempted, answered, failed by status/reason, and cache hits, per phase."""
    rows = []
    for phase in ("warm-up", "soak"):
        mine = [c for c in chats if c.fault == phase]
        rows.append(
            {
                "phase": phase,
                "attempted": len(mine),
                "answered": sum(c.outcome == "ok" for c in mine),
                "cache_hits": sum(c.outcome == "ok" and c.cache_hit for c in mine),
                "failed": dict(collections.Counter(c.outcome for c in mine if c.outcome != "ok")),
            }
        )
    return rows


def write_csv(path: Path, samples: list[Sample]) -> None:
    """One row per process and sample."""
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["t_s", "process", "pids", "rss_mb", "pss_mb", "cpu_s", "soak_chats"])
        for s in samples:
            for name in sorted(s.names(), key=_order):
                cpu = sum(c for n, *_, c in s.procs.values() if n == name)
                rss, pss = s.rss(name) / MB, s.pss(name) / MB
                row = [f"{s.at:.1f}", name, s.count(name), f"{rss:.2f}", f"{pss:.2f}"]
                out.writerow([*row, f"{cpu:.2f}", s.chats])


def _print(result: dict[str, Any]) -> None:
    soak = result["chats"][1]
    print(
        f"\nSoak: {result['minutes']:g} min after {result['warmup_s']:g} s of warm-up, "
        f"{result['concurrency']} clients, a sample every {result['every_s']:g} s "
        f"({result['samples']} samples); {soak['answered'] / result['seconds']:.1f} chats/s "
        f"answered, {soak['cache_hits'] / max(soak['answered'], 1):.0%} cache hits."
    )
    print(
        "RSS in MB (PostgreSQL: its processes summed, so shared buffers count once per backend"
        " that touched them; PSS counts them once); CPU ms per chat answered in the soak:"
    )
    header = (
        "process", "pids", "start", "end", "peak", "growth", "MB/h", "2nd half MB/h",
        "PSS growth", "CPU ms/chat",
    )  # fmt: skip
    lines = [
        (
            r["process"], str(r["pids"]), f"{r['rss_start_mb']:.1f}", f"{r['rss_end_mb']:.1f}",
            f"{r['rss_peak_mb']:.1f}", f"{r['growth_mb']:+.1f}", f"{r['mb_per_hour']:+.1f}",
            f"{r['second_half_mb_per_hour']:+.1f}", f"{r['pss_growth_mb']:+.1f}",
            f"{r['cpu_ms_per_chat']:.2f}",
        )
        for r in result["processes"]
    ]  # fmt: skip
    total_cpu = sum(r["cpu_ms_per_chat"] for r in result["processes"])
    total = sum(r["growth_mb"] for r in result["processes"])
    total_pss = sum(r["pss_growth_mb"] for r in result["processes"])
    lines.append(
        ("total", "", "", "", "", f"{total:+.1f}", "", "", f"{total_pss:+.1f}", f"{total_cpu:.2f}")
    )
    print(grid(header, lines))
    print("\nphase    attempted  answered  failed (status/reason)")
    for row in result["chats"]:
        failed = ", ".join(f"{k} x{v}" for k, v in sorted(row["failed"].items())) or "-"
        print(f"{row['phase']:<8}{row['attempted']:>11}{row['answered']:>10}  {failed}")
    for name, restarts in result["restarts"].items():
        print(f"  {name} restarted {restarts} time(s) during the run: its figures mix processes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the soak")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--quick", action="store_true", help="1 minute, a sample every 5 s")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of load before")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent chat clients")
    parser.add_argument("--latency-ms", type=int, default=20, help="upstream time to first token")
    parser.add_argument("--replicas", default="", help="orchestra up --replicas (router=2,...)")
    parser.add_argument("--csv", type=Path, help="write every sample to this CSV file")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.every, args.warmup = 1.0, 5.0, min(args.warmup, 10.0)
    upstream, upstream_url = start_fake_upstream(args.latency_ms, 8, MODEL)
    suite = Suite(ROOT, CONFIG.format(url=upstream_url, key=KEY), "soak", args.replicas)
    try:
        suite.start()
        before = {n: int(r["restarts"]) for n, r in supervised(suite.state_dir).items()}
        samples, chats = asyncio.run(run(suite, args))
        after = {n: int(r["restarts"]) for n, r in supervised(suite.state_dir).items()}
    finally:
        suite.stop()
        upstream.terminate()
        upstream.wait(timeout=10)
    rows = chat_rows(chats)
    result = {
        "minutes": args.minutes, "warmup_s": args.warmup, "every_s": args.every,
        "concurrency": args.concurrency, "samples": len(samples), "seconds": args.minutes * 60,
        "processes": memory_rows(samples, rows[1]["answered"]), "chats": rows,
        "restarts": {n: r - before.get(n, 0) for n, r in after.items() if r > before.get(n, 0)},
    }  # fmt: skip
    _print(result)
    if args.csv:
        write_csv(args.csv, samples)
        print(f"samples written to {args.csv}")
    if args.json:
        print(json.dumps(result))
    return 1 if any(row["failed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
