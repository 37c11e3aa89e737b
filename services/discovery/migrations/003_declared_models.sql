-- Models a provider declares instead of listing (a custom provider has no
-- listing endpoint): discovery reports exactly these. Empty: list as usual.
ALTER TABLE discovery.providers
    ADD COLUMN IF NOT EXISTS declared_models jsonb NOT NULL DEFAULT '[]'::jsonb;
