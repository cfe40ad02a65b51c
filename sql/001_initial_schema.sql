-- The schema as it stood before annual billing: no billing_cycle, no plan.
-- Other services of the backend write these tables; names and columns are a contract.

CREATE TABLE users (
    id text PRIMARY KEY,
    email text UNIQUE NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE organizations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    free_trial_end_at timestamptz NULL,
    require_seats boolean NOT NULL DEFAULT true,
    stripe_customer_id text NULL,
    credits_acquired_microdollars bigint NOT NULL DEFAULT 0,
    credits_used_microdollars bigint NOT NULL DEFAULT 0
);

CREATE TABLE organization_memberships (
    organization_id uuid REFERENCES organizations ON DELETE CASCADE,
    user_id text REFERENCES users ON DELETE CASCADE,
    role text NOT NULL CHECK (role IN ('owner', 'member', 'billing_manager')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, user_id)
);
-- "Which organizations is this user in?" for keys that name no organization.
CREATE INDEX organization_memberships_user_id_idx ON organization_memberships (user_id);

CREATE TABLE api_keys (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id text NOT NULL REFERENCES users ON DELETE CASCADE,
    -- lowercase hex SHA-256 of the whole bearer token; the token is never stored
    key_hash text UNIQUE NOT NULL,
    organization_id uuid NULL REFERENCES organizations ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz NULL
);

CREATE TABLE organization_seats_purchases (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations ON DELETE CASCADE,
    subscription_stripe_id text NOT NULL,
    seat_count integer NOT NULL CHECK (seat_count >= 0),
    subscription_status text NOT NULL DEFAULT 'active'
        CHECK (subscription_status IN ('active', 'pending_cancel', 'past_due', 'ended')),
    starts_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    idempotency_key text UNIQUE
);
-- The current purchase is the organization's row with the latest created_at.
CREATE INDEX organization_seats_purchases_current_idx
    ON organization_seats_purchases (organization_id, created_at DESC);
