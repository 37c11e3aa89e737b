-- The budget service's schema: accounts (tenants, teams, projects, API keys),
-- budget definitions and the spend ledger. The ledger is the truth; Redis only
-- holds fast counters that can be rebuilt from it.
CREATE SCHEMA IF NOT EXISTS budget;

CREATE TABLE budget.tenants (
    tenant_id    text PRIMARY KEY,
    display_name text NOT NULL DEFAULT '',
    -- orchestra.budget.v1.TenantPolicy in its proto3 JSON form.
    policy       jsonb NOT NULL DEFAULT '{}'::jsonb,
    create_time  timestamptz NOT NULL DEFAULT now(),
    -- Soft delete: the id stays taken because ledger and audit rows name it.
    delete_time  timestamptz
);

CREATE TABLE budget.teams (
    tenant_id    text NOT NULL REFERENCES budget.tenants (tenant_id),
    team_id      text NOT NULL,
    display_name text NOT NULL DEFAULT '',
    create_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, team_id)
);

CREATE TABLE budget.projects (
    tenant_id    text NOT NULL,
    project_id   text NOT NULL,
    team_id      text NOT NULL,
    display_name text NOT NULL DEFAULT '',
    create_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, project_id),
    FOREIGN KEY (tenant_id, team_id) REFERENCES budget.teams (tenant_id, team_id)
);

CREATE TABLE budget.api_keys (
    -- Global: the secret carries only the key id ("ok_<key_id>_<random>").
    key_id              text PRIMARY KEY,
    tenant_id           text NOT NULL REFERENCES budget.tenants (tenant_id),
    team_id             text NOT NULL DEFAULT '',
    project_id          text NOT NULL DEFAULT '',
    display_name        text NOT NULL DEFAULT '',
    scopes              text[] NOT NULL,
    -- SHA-256 of the secret; the secret itself is never stored.
    secret_sha256       bytea NOT NULL,
    requests_per_minute bigint NOT NULL DEFAULT 0,
    tokens_per_minute   bigint NOT NULL DEFAULT 0,
    -- Declared in the config file (bootstrap keeps its secret in sync).
    from_config         boolean NOT NULL DEFAULT false,
    create_time         timestamptz NOT NULL DEFAULT now(),
    expire_time         timestamptz,
    revoke_time         timestamptz
);
CREATE UNIQUE INDEX api_keys_secret_sha256 ON budget.api_keys (secret_sha256);
CREATE INDEX api_keys_tenant ON budget.api_keys (tenant_id, key_id);

CREATE TABLE budget.budgets (
    budget_id                text PRIMARY KEY,
    tenant_id                text NOT NULL REFERENCES budget.tenants (tenant_id),
    level                    smallint NOT NULL,
    subject                  text NOT NULL DEFAULT '',
    time_window              smallint NOT NULL,
    limit_micro_usd          bigint NOT NULL CHECK (limit_micro_usd > 0),
    soft                     boolean NOT NULL DEFAULT false,
    alert_thresholds_percent integer[] NOT NULL DEFAULT '{}',
    alert_webhook_url        text NOT NULL DEFAULT '',
    from_config              boolean NOT NULL DEFAULT false,
    create_time              timestamptz NOT NULL DEFAULT now(),
    -- One limit per thing and period; also the declarative bootstrap's key.
    UNIQUE (tenant_id, level, subject, time_window)
);

CREATE TABLE budget.ledger (
    request_id        text PRIMARY KEY,
    tenant_id         text NOT NULL,
    team              text NOT NULL DEFAULT '',
    project           text NOT NULL DEFAULT '',
    key_id            text NOT NULL DEFAULT '',
    end_user          text NOT NULL DEFAULT '',
    model             text NOT NULL DEFAULT '',
    held_micro_usd    bigint NOT NULL,
    cost_micro_usd    bigint NOT NULL CHECK (cost_micro_usd >= 0),
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    partial           boolean NOT NULL DEFAULT false,
    -- When the request was admitted: the budget window the spend counts in.
    spend_time        timestamptz NOT NULL,
    settle_time       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_tenant_spend_time ON budget.ledger (tenant_id, spend_time);
