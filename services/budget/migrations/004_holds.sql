-- Every hold Reserve grants, written right after Redis admitted it, so that a
-- Redis that lost its data (cold start) gets its open holds back: the rebuild
-- restores each hold that is neither settled (a ledger row) nor released.
-- `counters` are the Redis counter keys the hold reserved on. Rows are
-- deleted a day after they expire (the reaper), when no retry can need them.
CREATE TABLE budget.holds (
    request_id       text PRIMARY KEY,
    tenant_id        text NOT NULL,
    team             text NOT NULL DEFAULT '',
    project          text NOT NULL DEFAULT '',
    key_id           text NOT NULL DEFAULT '',
    end_user         text NOT NULL DEFAULT '',
    model            text NOT NULL DEFAULT '',
    amount_micro_usd bigint NOT NULL,
    tokens           bigint NOT NULL DEFAULT 0,
    counters         text[] NOT NULL,
    reserve_time     timestamptz NOT NULL,
    expire_time      timestamptz NOT NULL,
    -- Released (cache hit, refused) or given up by a Reserve that failed.
    released         boolean NOT NULL DEFAULT false
);
CREATE INDEX holds_expire_time ON budget.holds (expire_time);
