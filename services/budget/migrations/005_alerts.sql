-- Budget threshold alerts: one row per (budget, window, end user, threshold)
-- crossed, so that every replica agrees it is sent once; also the outbox the
-- webhook sender retries from.
CREATE TABLE budget.alerts (
    -- "<budget_id>/<window_key>/<threshold>" (+ "/<end_user>" for "*" budgets).
    alert_id          text PRIMARY KEY,
    tenant_id         text NOT NULL,
    budget_id         text NOT NULL,
    webhook_url       text NOT NULL,
    -- The JSON body POSTed (see services/budget/alerts.py).
    body              jsonb NOT NULL,
    create_time       timestamptz NOT NULL DEFAULT now(),
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_time timestamptz NOT NULL DEFAULT now(),
    delivered_time    timestamptz,
    -- Set when delivery stopped for good (too many failures).
    abandoned         boolean NOT NULL DEFAULT false,
    last_error        text NOT NULL DEFAULT ''
);
CREATE INDEX alerts_pending ON budget.alerts (next_attempt_time)
    WHERE delivered_time IS NULL AND NOT abandoned;
