-- Self-serve annual billing: invitations, the email outbox, Stripe events and the
-- per-subscription clock that keeps out-of-order webhooks from undoing newer state,
-- and requests to talk to sales about enterprise SSO.

CREATE TABLE organization_invitations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations ON DELETE CASCADE,
    email text NOT NULL,
    role text NOT NULL CHECK (role IN ('owner', 'member', 'billing_manager')),
    -- SHA-256 of the invitation token; the token itself only travels in the email.
    token_hash text UNIQUE NOT NULL,
    invited_by text NULL REFERENCES users ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    accepted_at timestamptz NULL,
    accepted_by text NULL REFERENCES users ON DELETE SET NULL,
    revoked_at timestamptz NULL
);
CREATE INDEX organization_invitations_pending_idx
    ON organization_invitations (organization_id)
    WHERE accepted_at IS NULL AND revoked_at IS NULL;

CREATE TABLE email_outbox (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    to_address text NOT NULL,
    subject text NOT NULL,
    body_text text NOT NULL,
    organization_id uuid NULL REFERENCES organizations ON DELETE SET NULL,
    -- Messages that must go at most once (a trial reminder per stage) name themselves.
    dedupe_key text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz NULL,
    last_error text NULL
);
CREATE INDEX email_outbox_due_idx ON email_outbox (next_attempt_at) WHERE sent_at IS NULL;

-- Every Stripe event id is recorded once; a redelivery finds its row and is ignored.
CREATE TABLE stripe_events (
    id text PRIMARY KEY,
    type text NOT NULL,
    created_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- The newest event applied to each subscription: an older one arriving later is ignored.
CREATE TABLE stripe_subscriptions (
    subscription_id text PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations ON DELETE CASCADE,
    last_event_created_at timestamptz NOT NULL,
    status text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sales_contact_requests (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations ON DELETE CASCADE,
    user_id text NOT NULL REFERENCES users ON DELETE CASCADE,
    topic text NOT NULL DEFAULT 'sso',
    message text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
