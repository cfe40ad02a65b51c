-- Organizations say which plan they are on instead of it being guessed from seats.
-- Existing organizations are teams; the design-partner and internal organizations
-- listed in config/defaults.toml ([migrations] enterprise_organization_ids) become
-- enterprise. The migration runner passes that list in the transaction-local setting
-- gateway.enterprise_organization_ids (comma-separated UUIDs).
ALTER TABLE organizations
    ADD COLUMN plan text NOT NULL DEFAULT 'teams' CHECK (plan IN ('teams', 'enterprise'));

UPDATE organizations
SET plan = 'enterprise'
WHERE id::text = ANY (
    string_to_array(
        nullif(current_setting('gateway.enterprise_organization_ids', true), ''), ','
    )
);
