"""The chaos benchmark's quick mode (``bench/chaos.py --quick``) as a test.

Two replicas of every service under steady chat traffic; a router replica, a
budget replica and a cache replica are SIGKILLed in turn, then Redis. The
goals of the full benchmark hold here too: no client-visible failure when a
budget or cache replica dies, at most the chats in flight when a router
replica dies, precise statuses (never INTERNAL) while Redis restarts, every
answered chat charged exactly what it was told and audited once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 4


def test_the_suite_rides_over_killed_replicas_and_a_redis_restart() -> None:
    run = subprocess.run(
        [sys.executable, "bench/chaos.py", "--quick", "--json", "--clients", str(CLIENTS)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    faults = {row["fault"]: row for row in result["faults"]}
    assert set(faults) == {"warm-up", "kill router-2", "kill budget", "kill cache-2", "kill redis"}
    for fault in ("warm-up", "kill budget", "kill cache-2"):
        assert faults[fault]["failed"] == {}, faults[fault]
        assert faults[fault]["answered"] > 0
    # A router replica takes the chats it was running with it (Envoy retries
    # those that had not answered yet); new chats go to the other replica.
    assert sum(faults["kill router-2"]["failed"].values()) <= CLIENTS, faults["kill router-2"]
    # While Redis restarts, chats are refused with a precise, retryable status.
    assert set(faults["kill redis"]["failed"]) <= {"UNAVAILABLE/STORE_UNAVAILABLE"}
    assert result["answered"] == result["ledger_matches"] == result["audited"]
    assert result["charged_for_failed_chats_micro_usd"] == 0
