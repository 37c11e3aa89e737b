"""The hold reaper: settles reservations whose router never came back.

A hold expires ``ttl_seconds`` after Reserve (default 10 minutes). Every
replica runs the reaper; each expired hold has exactly one outcome, whoever
gets there first:

* The ledger already has the request's charge (its Settle wrote the ledger
  and died before Redis moved): the hold is settled at that charge.
* The hold was given up durably (Reserve failed after holding, see
  :mod:`services.budget.holds`): it is released, nothing is charged.
* Otherwise the router died (or lost its outbox) mid-request. Nothing tells
  how much the provider produced, so the hold is settled at its **full
  reserved amount** — the worst case the router itself declared (prompt plus
  ``max_tokens`` at the model's price). The ledger row is marked ``reaped``.
  This never under-counts; it over-counts by the unused rest of one hold per
  dead router. A late Settle (or Release) of the same request id, e.g. from
  the router's outbox after a restart, replaces the reaped amount with the
  reported one, once, in the ledger and the counters.

The ledger row is written first with ``ON CONFLICT DO NOTHING``, so of a
racing Settle and several reapers exactly one amount is recorded; the Redis
settle script applies a hold at most once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable

from services.budget.counters import Counters
from services.budget.ledger import Charge, Ledger

log = logging.getLogger(__name__)

# Request ids of the holds that were given up durably (never to be charged).
GivenUp = Callable[[list[str]], Awaitable[set[str]]]
# Called with (tenant, counter keys) after a reaped charge reached the counters.
OnSettled = Callable[[str, list[str]], Awaitable[None]]


async def _none_given_up(request_ids: list[str]) -> set[str]:
    return set()


async def _nothing(tenant_id: str, counters: list[str]) -> None:
    return None


def reaped_charge(request_id: str, hold: dict[str, str]) -> Charge:
    """The provisional charge of an expired hold: its full reserved amount."""
    held = int(hold["held"])
    return Charge(
        request_id=request_id,
        tenant_id=hold["tenant_id"],
        team=hold.get("team", ""),
        project=hold.get("project", ""),
        key_id=hold.get("key_id", ""),
        end_user=hold.get("end_user", ""),
        model=hold.get("model", ""),
        held_micro_usd=held,
        cost_micro_usd=held,
        prompt_tokens=0,
        completion_tokens=0,
        partial=False,
        spend_time=dt.datetime.fromtimestamp(float(hold["reserve_time"]), dt.UTC),
        reaped=True,
    )


@dataclasses.dataclass
class Reaper:
    """Settles or releases expired holds; safe to run on every replica."""

    counters: Counters
    ledger: Ledger
    given_up: GivenUp = _none_given_up
    clock: Callable[[], float] = time.time
    on_settled: OnSettled = _nothing

    async def reap(self, limit: int) -> int:
        """Handles up to ``limit`` expired holds; returns how many."""
        now = self.clock()
        ids = await self.counters.expired(now, limit)
        if not ids:
            return 0
        charges = await self.ledger.find_many(ids)
        abandoned = await self.given_up([i for i in ids if i not in charges])
        for request_id in ids:
            hold = await self.counters.hold(request_id)
            if not hold or hold.get("state") != "held":
                await self.counters.forget(request_id)  # a stale entry: nothing is held
                continue
            keys = json.loads(hold["keys"])
            charge = charges.get(request_id)
            if charge is None and request_id in abandoned:
                await self.counters.release(request_id, keys, expired_before=now)
                continue
            if charge is None:
                charge, wrote = await self.ledger.record(reaped_charge(request_id, hold))
                if wrote:
                    log.warning(
                        "hold %s of tenant %s expired without a settle: charged its full"
                        " %d micro-USD",
                        request_id,
                        charge.tenant_id,
                        charge.cost_micro_usd,
                    )
            state = await self.counters.settle(
                request_id, keys, charge.cost_micro_usd, reaped=charge.reaped
            )
            if state == "held":
                await self.on_settled(charge.tenant_id, keys)
        return len(ids)
