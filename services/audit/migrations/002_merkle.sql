-- The Merkle tree over audit.records, and its signed checkpoints.
--
-- audit.subtrees caches the hash of every complete, aligned subtree of
-- 2^level leaves for level >= 3 (tree_store.MIN_LEVEL; smaller ones are hashed
-- from audit.records.leaf_hash on demand): the leaves
-- [position * 2^level, (position + 1) * 2^level). The sequencer writes them in
-- the append's transaction, so any proof needs at most ~log2(n)^2 cached
-- hashes, fetched in one query. They are a cache: verification recomputes the
-- tree from the records alone.
CREATE TABLE audit.subtrees (
    level     smallint NOT NULL CHECK (level >= 1 AND level < 63),
    position  bigint   NOT NULL CHECK (position >= 0),
    hash      bytea    NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, position)
);

-- One signed tree head per append batch (see services/audit/signing.py for
-- the exact text signed).
CREATE TABLE audit.checkpoints (
    tree_size   bigint PRIMARY KEY CHECK (tree_size > 0),
    root_hash   bytea  NOT NULL CHECK (length(root_hash) = 32),
    -- Whole seconds since the epoch: the signed note carries exactly this.
    unix_time   bigint NOT NULL,
    signature   bytea  NOT NULL,
    key_id      text   NOT NULL
);

CREATE FUNCTION audit.refuse_rewrite_any() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'rows can only be appended';
END;
$$;

CREATE TRIGGER subtrees_no_update_delete
    BEFORE UPDATE OR DELETE ON audit.subtrees
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_rewrite_any();
CREATE TRIGGER subtrees_no_truncate
    BEFORE TRUNCATE ON audit.subtrees
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_rewrite_any();
CREATE TRIGGER checkpoints_no_update_delete
    BEFORE UPDATE OR DELETE ON audit.checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_rewrite_any();
CREATE TRIGGER checkpoints_no_truncate
    BEFORE TRUNCATE ON audit.checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_rewrite_any();
