-- Health and latency probes (services/discovery/probes.py), and Ollama's memory figures.

-- When the provider is next due for a probe; replicas claim due providers
-- with UPDATE ... FOR UPDATE SKIP LOCKED, so each probe runs on one replica.
ALTER TABLE discovery.providers ADD COLUMN next_probe_time timestamptz;
-- The round-robin position: which of its models the next probe uses.
ALTER TABLE discovery.providers ADD COLUMN probe_cursor integer NOT NULL DEFAULT 0;

-- Ollama /api/ps: bytes in accelerator memory (size_vram) and in all (size).
ALTER TABLE discovery.models ADD COLUMN vram_bytes bigint NOT NULL DEFAULT 0;
ALTER TABLE discovery.models ADD COLUMN memory_bytes bigint NOT NULL DEFAULT 0;

-- Rolling probe statistics of a provider (subject = provider_id) or of one
-- of its models (subject = "<provider_id>/<model_id>").
CREATE TABLE discovery.probe_stats (
    subject              text PRIMARY KEY,
    provider_id          text NOT NULL REFERENCES discovery.providers (provider_id) ON DELETE CASCADE,
    status               smallint NOT NULL DEFAULT 0,
    -- the newest probes, oldest first: [{"ok": bool, "ttft_ms": n|null, "tps": x|null}]
    samples              jsonb NOT NULL DEFAULT '[]'::jsonb,
    ttft_ewma_ms         double precision,
    consecutive_failures integer NOT NULL DEFAULT 0,
    consecutive_passes   integer NOT NULL DEFAULT 0,
    last_error           text NOT NULL DEFAULT '',
    probed_model_id      text NOT NULL DEFAULT '',
    last_probe_time      timestamptz
);
CREATE INDEX probe_stats_provider ON discovery.probe_stats (provider_id);
