"""Budget threshold alerts: one webhook POST per threshold per window.

A budget lists ``alert_thresholds_percent`` (e.g. 50, 80, 100); a soft budget
also alerts at 100% even if it does not list it (a soft limit warns instead of
refusing). After each settlement the settled spend of the request's budgets
is compared with their thresholds; each threshold crossed in a window is
recorded once in ``budget.alerts`` (its primary key is the budget, window,
end user and threshold, so several replicas, retries and Redis rebuilds still
give one row) and POSTed to ``alert_webhook_url`` from there. Thresholds
compare settled spend, not holds, so a hold that is later released never
alerts.

Delivery is at least once, retried with exponential backoff (1 s doubling to
5 min, at most 12 attempts) by a sender on every replica that claims rows
with ``FOR UPDATE SKIP LOCKED``; a receiver dedups on ``alert_id``. Any 2xx
answer is success. A budget without a webhook URL has its alerts logged only.

The body (``Content-Type: application/json``)::

    {
      "type": "orchestra.budget.threshold_crossed",
      "alert_id": "bud-1a2b/2026-11/80",
      "tenant_id": "acme",
      "budget_id": "bud-1a2b",
      "level": "team",               // tenant, team, project, api_key, end_user
      "subject": "ml",               // the team, project, key or "*"; "" for the tenant
      "end_user": "",                // the end user, for per-end-user ("*") budgets
      "window": "month",             // day, month, total
      "window_key": "2026-11",       // the calendar day or month in the tenant's zone
      "threshold_percent": 80,
      "limit_micro_usd": 100000000,
      "spent_micro_usd": 80512000,   // settled spend when the threshold was seen crossed
      "soft": false,
      "create_time": "2026-11-24T03:12:45Z"
    }
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import httpx

from orchestra.budget.v1 import budget_service_pb2 as pb
from services.budget.catalog import Catalog
from services.budget.counters import PREFIX, Counters
from services.common.outages import postgres_outage

log = logging.getLogger(__name__)

ALERT_TYPE = "orchestra.budget.threshold_crossed"
MAX_ATTEMPTS = 12
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 300.0
POST_TIMEOUT_SECONDS = 5.0
SEND_INTERVAL_SECONDS = 1.0
SEND_BATCH = 50
_COUNTER_PREFIX = f"{PREFIX}ctr:"
_MAX_REMEMBERED = 100_000


def thresholds(budget: pb.Budget) -> list[int]:
    """The percentages at which ``budget`` alerts (soft budgets always at 100)."""
    found = set(budget.alert_thresholds_percent)
    if budget.soft:
        found.add(100)
    return sorted(found)


def _parse_counter(key: str) -> tuple[str, str, str] | None:
    """(budget_id, window key, end user) of a counter key, None if not one."""
    if not key.startswith(_COUNTER_PREFIX):
        return None
    parts = key[len(_COUNTER_PREFIX) :].split(":", 2)
    if len(parts) < 2:
        return None
    end_user = parts[2].removeprefix("u:") if len(parts) == 3 else ""
    return parts[0], parts[1], end_user


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


@dataclasses.dataclass(frozen=True)
class PendingAlert:
    """An alert to POST."""

    alert_id: str
    webhook_url: str
    body: str
    attempts: int


class AlertStore:
    """The ``budget.alerts`` table: the once-only record and the sender's outbox."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @postgres_outage
    async def record(
        self, alert_id: str, tenant_id: str, budget_id: str, url: str, body: dict[str, Any]
    ) -> bool:
        """Records an alert unless it exists; True if this call recorded it."""
        row = await self._pool.fetchrow(
            "INSERT INTO budget.alerts (alert_id, tenant_id, budget_id, webhook_url, body,"
            " delivered_time) VALUES ($1, $2, $3, $4, $5::jsonb,"
            " CASE WHEN $4 = '' THEN now() END)"
            " ON CONFLICT (alert_id) DO NOTHING RETURNING alert_id",
            alert_id,
            tenant_id,
            budget_id,
            url,
            json.dumps(body),
        )
        return row is not None

    @postgres_outage
    async def claim(self, limit: int) -> list[PendingAlert]:
        """Takes up to ``limit`` alerts due for a POST (pushing their next attempt back)."""
        rows = await self._pool.fetch(
            "UPDATE budget.alerts a SET attempts = a.attempts + 1,"
            " next_attempt_time = now() + make_interval(secs => least($2 * power(2, a.attempts),"
            " $3))"
            " FROM (SELECT alert_id FROM budget.alerts WHERE delivered_time IS NULL"
            "  AND NOT abandoned AND next_attempt_time <= now() ORDER BY next_attempt_time"
            "  LIMIT $1 FOR UPDATE SKIP LOCKED) due"
            " WHERE a.alert_id = due.alert_id"
            " RETURNING a.alert_id, a.webhook_url, a.body::text AS body, a.attempts",
            limit,
            FIRST_RETRY_SECONDS,
            MAX_RETRY_SECONDS,
        )
        return [
            PendingAlert(r["alert_id"], r["webhook_url"], r["body"], r["attempts"]) for r in rows
        ]

    @postgres_outage
    async def delivered(self, alert_id: str) -> None:
        """Marks an alert sent."""
        await self._pool.execute(
            "UPDATE budget.alerts SET delivered_time = now() WHERE alert_id = $1", alert_id
        )

    @postgres_outage
    async def failed(self, alert_id: str, error: str, give_up: bool) -> None:
        """Records a failed POST (and stops retrying if ``give_up``)."""
        await self._pool.execute(
            "UPDATE budget.alerts SET last_error = $2, abandoned = $3 WHERE alert_id = $1",
            alert_id,
            error[:500],
            give_up,
        )


class Alerts:
    """Detects crossed thresholds and sends their webhooks."""

    def __init__(
        self,
        store: AlertStore,
        catalog: Catalog,
        counters: Counters,
        *,
        clock: Callable[[], float] = time.time,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._counters = counters
        self._clock = clock
        self._http = http or httpx.AsyncClient(timeout=POST_TIMEOUT_SECONDS)
        self._seen: set[str] = set()  # alert ids this replica knows are recorded
        self._wake = asyncio.Event()

    async def check(self, tenant_id: str, counter_keys: Sequence[str]) -> None:
        """Records the thresholds the settled spend on ``counter_keys`` has crossed.

        Never raises: an alert missed now is found by the next settlement,
        since spend only grows within a window.
        """
        try:
            await self._check(tenant_id, counter_keys)
        except Exception:  # alerts must never fail a settlement
            log.exception("budget alert check failed for tenant %s", tenant_id)

    async def _check(self, tenant_id: str, counter_keys: Sequence[str]) -> None:
        context = await self._catalog.tenant(tenant_id)
        alerting = {b.budget_id: b for b in context.budgets if thresholds(b)}
        wanted = []
        for key in counter_keys:
            parsed = _parse_counter(key)
            if parsed is not None and parsed[0] in alerting:
                wanted.append((key, parsed))
        if not wanted:
            return
        values = await self._counters.read([key for key, _ in wanted])
        for (_, (budget_id, window_key, end_user)), (spent, _) in zip(wanted, values, strict=True):
            budget = alerting[budget_id]
            for percent in thresholds(budget):
                if spent * 100 < percent * budget.limit_micro_usd:
                    break
                alert_id = f"{budget_id}/{window_key}/{percent}" + (
                    f"/{end_user}" if end_user else ""
                )
                if alert_id in self._seen:
                    continue
                body = self._body(alert_id, budget, window_key, end_user, percent, spent)
                if await self._store.record(
                    alert_id, tenant_id, budget_id, budget.alert_webhook_url, body
                ):
                    log.warning(
                        "budget %s of tenant %s crossed %d%% (%d of %d micro-USD) in %s",
                        budget_id,
                        tenant_id,
                        percent,
                        spent,
                        budget.limit_micro_usd,
                        window_key,
                    )
                    self._wake.set()
                if len(self._seen) >= _MAX_REMEMBERED:
                    self._seen.clear()
                self._seen.add(alert_id)

    def _body(
        self,
        alert_id: str,
        budget: pb.Budget,
        window_key: str,
        end_user: str,
        percent: int,
        spent: int,
    ) -> dict[str, Any]:
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        return {
            "type": ALERT_TYPE,
            "alert_id": alert_id,
            "tenant_id": budget.tenant_id,
            "budget_id": budget.budget_id,
            "level": _name(pb.BudgetLevel, budget.level, "BUDGET_LEVEL_"),
            "subject": budget.subject,
            "end_user": end_user,
            "window": _name(pb.BudgetWindow, budget.window, "BUDGET_WINDOW_"),
            "window_key": window_key,
            "threshold_percent": percent,
            "limit_micro_usd": budget.limit_micro_usd,
            "spent_micro_usd": spent,
            "soft": budget.soft,
            "create_time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    async def send_due(self) -> int:
        """POSTs the alerts due now; returns how many were attempted."""
        due = await self._store.claim(SEND_BATCH)
        for alert in due:
            try:
                response = await self._http.post(
                    alert.webhook_url,
                    content=alert.body,
                    headers={"Content-Type": "application/json"},
                )
                response.raise_for_status()
            except httpx.HTTPError as exc:
                give_up = alert.attempts >= MAX_ATTEMPTS
                log.warning(
                    "budget alert %s to %s failed (attempt %d%s): %s",
                    alert.alert_id,
                    alert.webhook_url,
                    alert.attempts,
                    ", giving up" if give_up else "",
                    exc,
                )
                await self._store.failed(alert.alert_id, str(exc), give_up)
                continue
            await self._store.delivered(alert.alert_id)
        return len(due)

    async def send_forever(self) -> None:
        """The sender loop: at once after a new alert, else every second."""
        while True:
            try:
                sent = await self.send_due()
            except Exception:  # the sender must survive and retry
                log.exception("budget alert sender failed")
                sent = 0
            if sent < SEND_BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), SEND_INTERVAL_SECONDS)
                self._wake.clear()

    async def close(self) -> None:
        """Closes the HTTP client."""
        await self._http.aclose()
