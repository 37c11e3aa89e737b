-- The audit log: one row per record, append-only.
--
-- `index` is gap-free because one sequencer assigns it (a transaction-level
-- advisory lock, see store.py) instead of a sequence, whose values a rolled-back
-- transaction would burn. There is deliberately no mutable "head" row: the
-- service's role needs only INSERT and SELECT on this schema.
CREATE SCHEMA IF NOT EXISTS audit;

CREATE TABLE audit.records (
    index       bigint      PRIMARY KEY CHECK (index >= 0),
    event_id    text        NOT NULL UNIQUE,
    tenant_id   text        NOT NULL,
    event_time  timestamptz NOT NULL,
    kind        smallint    NOT NULL,
    actor       text        NOT NULL,
    model       text        NOT NULL,
    end_user    text        NOT NULL,
    -- The canonical record bytes: the leaf hash covers exactly these.
    record      bytea       NOT NULL,
    -- SHA-256(0x00 || record), RFC 6962.
    leaf_hash   bytea       NOT NULL CHECK (length(leaf_hash) = 32),
    -- SHA-256(chain_hash of index - 1 || leaf_hash); 32 zero bytes before 0.
    chain_hash  bytea       NOT NULL CHECK (length(chain_hash) = 32)
);

-- ListRecords is always per tenant, in index order.
CREATE INDEX records_tenant_index ON audit.records (tenant_id, index);

-- History cannot be rewritten, not even by the service's own bugs: every
-- UPDATE, DELETE or TRUNCATE statement on the table fails, whatever it matches.
CREATE FUNCTION audit.refuse_rewrite() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit.records is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'records can only be appended';
END;
$$;

CREATE TRIGGER records_no_update_delete
    BEFORE UPDATE OR DELETE ON audit.records
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_rewrite();

CREATE TRIGGER records_no_truncate
    BEFORE TRUNCATE ON audit.records
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_rewrite();
