-- Discovery's schema: providers (credential encrypted) and the models each lists.
CREATE SCHEMA IF NOT EXISTS discovery;

CREATE TABLE discovery.providers (
    provider_id         text PRIMARY KEY,
    display_name        text NOT NULL DEFAULT '',
    provider_type       smallint NOT NULL,
    base_url            text NOT NULL,
    -- version || nonce || AES-GCM ciphertext (services/discovery/crypto.py); NULL: none
    credential_sealed   bytea,
    credential_hint     text NOT NULL DEFAULT '',
    headers             jsonb NOT NULL DEFAULT '{}'::jsonb,
    organization        text NOT NULL DEFAULT '',
    local               boolean NOT NULL DEFAULT false,
    enabled             boolean NOT NULL DEFAULT true,
    connect_timeout_ms  integer NOT NULL DEFAULT 5000 CHECK (connect_timeout_ms > 0),
    read_timeout_ms     integer NOT NULL DEFAULT 60000 CHECK (read_timeout_ms > 0),
    requests_per_minute bigint NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
    tokens_per_minute   bigint NOT NULL DEFAULT 0 CHECK (tokens_per_minute >= 0),
    -- 'config': declared in the config file (re-applied at every start); 'api': by RPC
    source              text NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'config')),
    health_status       smallint NOT NULL DEFAULT 0,
    last_error          text NOT NULL DEFAULT '',
    last_probe_time     timestamptz,
    create_time         timestamptz NOT NULL DEFAULT now(),
    update_time         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE discovery.models (
    -- "<provider_id>/<model_id>"
    name                text PRIMARY KEY,
    provider_id         text NOT NULL REFERENCES discovery.providers (provider_id) ON DELETE CASCADE,
    model_id            text NOT NULL,
    context_window      integer NOT NULL DEFAULT 0,
    max_output_tokens   integer NOT NULL DEFAULT 0,
    loaded              boolean NOT NULL DEFAULT false,
    first_seen_time     timestamptz NOT NULL DEFAULT now(),
    last_seen_time      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider_id, model_id)
);

-- Pages of ListModels are ordered by name in byte order (COLLATE "C").
CREATE INDEX models_name_c ON discovery.models (name COLLATE "C");
