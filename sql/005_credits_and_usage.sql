-- Credits: a ledger of what each organization acquired, and one row per metered request.
-- Balance = credits_acquired_microdollars - credits_used_microdollars.

CREATE TABLE credit_transactions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations ON DELETE CASCADE,
    amount_microdollars bigint NOT NULL,
    is_free boolean NOT NULL DEFAULT false,
    description text,
    -- One ledger row per Stripe payment, however often the webhook is delivered.
    stripe_payment_id text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_transactions_organization_idx
    ON credit_transactions (organization_id, created_at);

-- Credits acquired before the ledger existed become its opening rows, so the sum of the
-- ledger equals credits_acquired_microdollars from the start.
INSERT INTO credit_transactions (organization_id, amount_microdollars, description)
SELECT id, credits_acquired_microdollars, 'Opening balance'
FROM organizations
WHERE credits_acquired_microdollars <> 0;

-- The ledger keeps organizations.credits_acquired_microdollars equal to its sum, whoever
-- writes it; the update also NOTIFYs every gateway through organizations_notify.
CREATE FUNCTION credit_transactions_sync() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE organizations
        SET credits_acquired_microdollars = credits_acquired_microdollars - OLD.amount_microdollars
        WHERE id = OLD.organization_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        UPDATE organizations
        SET credits_acquired_microdollars = credits_acquired_microdollars + NEW.amount_microdollars
        WHERE id = NEW.organization_id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER credit_transactions_sync
    AFTER INSERT OR UPDATE OR DELETE ON credit_transactions
    FOR EACH ROW EXECUTE FUNCTION credit_transactions_sync();

CREATE TABLE llm_usage (
    -- The X-Request-Id the gateway gave the response: a retried batch inserts nothing twice.
    request_id text PRIMARY KEY,
    organization_id uuid NOT NULL,
    user_id text NOT NULL,
    model text,
    prompt_tokens integer,
    completion_tokens integer,
    cost_microdollars bigint NOT NULL,
    streamed boolean NOT NULL,
    status integer NOT NULL,
    cancelled boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_usage_organization_created_idx ON llm_usage (organization_id, created_at);
