"""Fuzzed input through the edge, at length: many random and damaged messages per RPC.

The long run of ``tests/fuzz``: a real ``orchestra up --no-local-model``
(:func:`tests.fuzz.edge.start_suite`, the OpenAI-wire fake as its only
provider) and, for every public RPC of the contracts, ``--examples`` inputs
drawn at random (:mod:`tests.fuzz.strategies`: valid random messages, or
serializations with bytes flipped, inserted, deleted, repeated or cut off),
each with a valid key (all scopes, or only chat and read) or without one
(none, garbled, a forged identity header). Every answer must be a success
whose messages parse, or a refusal with a precise code (never INTERNAL or
UNKNOWN) and an ``ErrorInfo`` reason in ``grpc-status-details-bin``.

It prints one row per RPC (inputs tried, the statuses seen with counts, bad
answers), then every bad answer with a reproducer (the RPC, the auth, each
body as text and as hex), one per RPC and kind of problem. Exit status 1 when
there was any bad answer.

    .venv/bin/python bench/fuzz.py [--examples 200] [--seed N] [--rpc SUBSTRING] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from pathlib import Path

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "gen"))

from tests.fuzz import edge as fuzz  # noqa: E402
from tests.fuzz.strategies import wire  # noqa: E402

AUTH = st.sampled_from(["admin", "admin", "admin", "reader", "none", "garbled", "forged"])
GARBAGE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


class Tally:
    """What one RPC got: outcome counts and one reproducer per kind of problem."""

    def __init__(self) -> None:
        self.tried = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.bad = 0
        self.reproducers: dict[str, str] = {}

    def add(self, answer: fuzz.Answer, reproducer: str) -> None:
        self.tried += 1
        self.outcomes[answer.outcome] += 1
        if answer.problem:
            self.bad += 1
            kind = f"{answer.outcome}: {answer.problem}"
            self.reproducers.setdefault(kind, f"{reproducer}\n  message: {answer.message!r}")


def _bodies(rpc: fuzz.Rpc) -> st.SearchStrategy[list[bytes]]:
    if rpc.client_streaming:
        return st.lists(wire(rpc.input), min_size=0, max_size=3)
    return wire(rpc.input).map(lambda body: [body])


def fuzz_rpc(
    loop: asyncio.AbstractEventLoop, channel: grpc.aio.Channel, rpc: fuzz.Rpc,
    examples: int, random_seed: int,
) -> Tally:  # fmt: skip
    """Sends ``examples`` fuzzed calls to ``rpc``; never stops at a bad answer."""
    tally = Tally()

    @seed(random_seed)
    @settings(
        max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(sent=_bodies(rpc), auth=AUTH, garbage=GARBAGE)
    def one(sent: list[bytes], auth: str, garbage: str) -> None:
        meta = fuzz.metadata(auth, fuzz.KEYS, garbage)
        answer = loop.run_until_complete(fuzz.call(channel, rpc, sent, meta))
        tally.add(answer, fuzz.describe(rpc, sent, auth, garbage))

    one()
    return tally


def _table(tallies: dict[str, Tally]) -> str:
    lines = [f"{'RPC':<44} {'tried':>5} {'bad':>4}  statuses"]
    for name, tally in tallies.items():
        seen = ", ".join(f"{o} {n}" for o, n in tally.outcomes.most_common())
        lines.append(f"{name:<44} {tally.tried:>5} {tally.bad:>4}  {seen}")
    return "\n".join(lines)


async def _channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=fuzz.CHANNEL_OPTIONS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="inputs per RPC")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="hypothesis seed")
    parser.add_argument("--rpc", default="", help="only RPCs whose path contains this")
    parser.add_argument("--json", action="store_true", help="a JSON line at the end")
    args = parser.parse_args()
    rpcs = [r for r in fuzz.public_rpcs() if args.rpc in r.path]
    suite, upstream = fuzz.start_suite()
    loop = asyncio.new_event_loop()
    tallies: dict[str, Tally] = {}
    started = time.monotonic()
    try:
        channel = loop.run_until_complete(_channel(suite.edge))
        for rpc in rpcs:
            tallies[rpc.name] = fuzz_rpc(loop, channel, rpc, args.examples, args.seed)
            print(f"{rpc.name}: {tallies[rpc.name].tried} tried", file=sys.stderr, flush=True)
        loop.run_until_complete(channel.close())
    finally:
        loop.close()
        suite.stop()
        upstream.terminate()
    elapsed = time.monotonic() - started
    print(f"seed {args.seed}, {args.examples} examples per RPC, {elapsed:.0f} s\n")
    print(_table(tallies))
    bad = sum(t.bad for t in tallies.values())
    for name, tally in tallies.items():
        for kind, reproducer in tally.reproducers.items():
            print(f"\nBAD {name}: {kind}\n{reproducer}")
    print(f"\n{sum(t.tried for t in tallies.values())} calls, {bad} bad answers")
    if args.json:
        print(json.dumps({
            "seed": args.seed, "bad": bad,
            "rpcs": {n: {"tried": t.tried, "bad": t.bad, "outcomes": dict(t.outcomes),
                         "problems": list(t.reproducers)} for n, t in tallies.items()},
        }))  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
