-- Administrative-change audit records waiting for the audit service
-- (services/common/audit_client.py): written before the RPC answers, deleted
-- once the audit log has the record, so a crash or an audit outage loses none.
CREATE TABLE discovery.admin_outbox (
    id          bigserial   PRIMARY KEY,
    event_id    text        NOT NULL UNIQUE,
    -- orchestra.audit.v1.AuditRecord, serialized.
    record      bytea       NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    -- Why the audit service refused the record for good; NULL: still to deliver.
    refused     text
);
