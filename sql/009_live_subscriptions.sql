-- Several live subscriptions per organization: the rule now judges each Stripe
-- subscription's newest row (its state now) and adds up what they pay for, instead of
-- only the organization's newest row.

-- Stripe's own status beside the purchase status it maps to (a trialing subscription is
-- an active purchase whose first charge is at expires_at). NULL on older rows.
ALTER TABLE organization_seats_purchases ADD COLUMN stripe_status text NULL;

-- Each subscription's newest row, for the facts query's DISTINCT ON.
CREATE INDEX organization_seats_purchases_subscription_idx
    ON organization_seats_purchases (organization_id, subscription_stripe_id, created_at DESC, id DESC);

-- Webhooks apply the subscription as Stripe has it now, read back at delivery; `version`
-- counts the states applied, so a state read before another one was written is read again
-- instead of overwriting it (whatever the order or timestamps of the events).
ALTER TABLE stripe_subscriptions ADD COLUMN version bigint NOT NULL DEFAULT 0;

-- Until now an ended subscription's state was not written while another subscription of
-- the organization was newer and paying (only the newest row counted). Each subscription
-- counting on its own, such a subscription would count again: end it where Stripe said
-- it ended (its recorded Stripe status), as of when that was recorded.
INSERT INTO organization_seats_purchases (organization_id, subscription_stripe_id, seat_count,
    subscription_status, billing_cycle, starts_at, expires_at, idempotency_key, stripe_status)
SELECT p.organization_id, p.subscription_stripe_id, p.seat_count, 'ended', p.billing_cycle,
       p.starts_at, least(p.expires_at, greatest(p.starts_at, s.updated_at)),
       'migration-009:' || p.subscription_stripe_id, s.status
FROM (
    SELECT DISTINCT ON (subscription_stripe_id) *
    FROM organization_seats_purchases
    ORDER BY subscription_stripe_id, created_at DESC, id DESC
) p
JOIN stripe_subscriptions s ON s.subscription_id = p.subscription_stripe_id
WHERE p.subscription_status <> 'ended'
  AND s.status NOT IN ('active', 'trialing', 'past_due');
