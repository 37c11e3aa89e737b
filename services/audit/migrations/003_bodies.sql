-- Chat bodies kept beside the log, and the per-subject keys that seal them.
--
-- A record's leaf commits to its sealed body (ChatEvent.body_sha256), never to
-- the plaintext, and the sealed bytes live here, outside audit.records. So:
--   * erasing a subject deletes its rows in audit.subject_keys: its bodies can
--     never be decrypted again, while every leaf and checkpoint still verifies;
--   * retention deletes rows of audit.bodies past their expire_time, again
--     without touching a hashed row (audit.records keeps its triggers).
-- Neither table is append-only: the service's role needs DELETE on both.

-- One live key per subject (tenant + end user). The key is 32 random bytes,
-- wrapped (AES-GCM) by a master key derived from ORCHESTRA_INTERNAL_KEY; a row
-- is deleted, never updated, when the subject is erased.
CREATE TABLE audit.subject_keys (
    key_id       text        PRIMARY KEY,
    tenant_id    text        NOT NULL,
    end_user     text        NOT NULL,
    wrapped      bytea       NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, end_user)
);

-- One sealed body per chat record that keeps one, written in the append's
-- transaction. No foreign keys: key_id's key goes on erasure while the (now
-- unreadable) ciphertext stays until retention drops it, and a reference to
-- audit.records would turn its TRUNCATE trigger's refusal into another error.
CREATE TABLE audit.bodies (
    event_id     text        PRIMARY KEY,
    tenant_id    text        NOT NULL,
    end_user     text        NOT NULL,
    key_id       text        NOT NULL,
    -- version byte || 12-byte nonce || AES-256-GCM ciphertext and tag.
    sealed       bytea       NOT NULL,
    -- When retention drops it; NULL: kept until the subject is erased.
    expire_time  timestamptz
);

CREATE INDEX bodies_expire ON audit.bodies (expire_time) WHERE expire_time IS NOT NULL;
CREATE INDEX bodies_key ON audit.bodies (key_id);
