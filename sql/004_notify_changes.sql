-- Every change that can alter a verdict is announced on the channel gateway_changes,
-- so every gateway process evicts what it cached within a second instead of after
-- the TTL. The payload names the affected table, organization, user and key (ids
-- only, never a key hash). An update announces the old row and the new one, so a row
-- moved to another organization evicts both; PostgreSQL folds identical payloads
-- sent in one transaction into one notification.

CREATE FUNCTION gateway_change_payload(table_name text, r jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'table', table_name,
        'organization_id',
            CASE WHEN table_name = 'organizations' THEN r -> 'id' ELSE r -> 'organization_id' END,
        'user_id', r -> 'user_id',
        'key_id', CASE WHEN table_name = 'api_keys' THEN r -> 'id' END
    ))::text
$$;

CREATE FUNCTION gateway_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('gateway_changes', gateway_change_payload(TG_TABLE_NAME, to_jsonb(OLD)));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('gateway_changes', gateway_change_payload(TG_TABLE_NAME, to_jsonb(NEW)));
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER organizations_notify
    AFTER INSERT OR UPDATE OR DELETE ON organizations
    FOR EACH ROW EXECUTE FUNCTION gateway_notify_change();
CREATE TRIGGER organization_memberships_notify
    AFTER INSERT OR UPDATE OR DELETE ON organization_memberships
    FOR EACH ROW EXECUTE FUNCTION gateway_notify_change();
CREATE TRIGGER organization_seats_purchases_notify
    AFTER INSERT OR UPDATE OR DELETE ON organization_seats_purchases
    FOR EACH ROW EXECUTE FUNCTION gateway_notify_change();
CREATE TRIGGER api_keys_notify
    AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION gateway_notify_change();
