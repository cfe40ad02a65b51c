-- A change to an organization must be judged on at once by the next request, except the
-- ledger's own charge batches, which move only credits_used_microdollars many times a
-- second: for those the gateway may serve the cached facts while it reads them again.
-- So an update that changed nothing but credits_used_microdollars says so in its payload
-- ("change": "credits_used"); every other change carries no such mark.

CREATE FUNCTION gateway_change_payload(table_name text, r jsonb, credits_used_only boolean)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'table', table_name,
        'organization_id',
            CASE WHEN table_name = 'organizations' THEN r -> 'id' ELSE r -> 'organization_id' END,
        'user_id', r -> 'user_id',
        'key_id', CASE WHEN table_name = 'api_keys' THEN r -> 'id' END,
        'change', CASE WHEN credits_used_only THEN 'credits_used' END
    ))::text
$$;

CREATE OR REPLACE FUNCTION gateway_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    credits_used_only boolean := TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'organizations'
        AND to_jsonb(OLD) - 'credits_used_microdollars'
            = to_jsonb(NEW) - 'credits_used_microdollars';
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('gateway_changes',
            gateway_change_payload(TG_TABLE_NAME, to_jsonb(OLD), credits_used_only));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('gateway_changes',
            gateway_change_payload(TG_TABLE_NAME, to_jsonb(NEW), credits_used_only));
    END IF;
    RETURN NULL;
END;
$$;

DROP FUNCTION gateway_change_payload(text, jsonb);
