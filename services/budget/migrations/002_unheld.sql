-- Requests admitted while Redis was unreachable, for tenants that fail open.
-- They hold nothing in Redis; this row says who pays so that Settle can write
-- the ledger without the Redis hold, and `applied` tells the reaper whether
-- the settled cost (or the expiry) has been carried into the Redis counters.
CREATE TABLE budget.unheld (
    request_id     text PRIMARY KEY,
    tenant_id      text NOT NULL,
    team           text NOT NULL DEFAULT '',
    project        text NOT NULL DEFAULT '',
    key_id         text NOT NULL DEFAULT '',
    end_user       text NOT NULL DEFAULT '',
    model          text NOT NULL DEFAULT '',
    amount_micro_usd bigint NOT NULL,
    tokens         bigint NOT NULL DEFAULT 0,
    reserve_time   timestamptz NOT NULL,
    expire_time    timestamptz NOT NULL,
    applied        boolean NOT NULL DEFAULT false
);
CREATE INDEX unheld_pending ON budget.unheld (expire_time) WHERE NOT applied;
