-- Failed payments: a past_due subscription pays only for a grace period after its
-- payment failed (PAST_DUE_GRACE_DAYS), no longer for its whole period (a failed renewal
-- would otherwise buy the new period). The instant is kept on the purchase row, whose
-- NOTIFY (organization_seats_purchases_notify) makes every gateway re-read the
-- organization at once; each later row of the subscription carries it over while it
-- stays past_due, and a paid invoice writes a row without it.
ALTER TABLE organization_seats_purchases ADD COLUMN payment_failed_at timestamptz NULL;

-- A subscription already past_due failed no later than when that state was recorded:
-- its grace counts from then, not from the deploy.
UPDATE organization_seats_purchases SET payment_failed_at = created_at
WHERE subscription_status = 'past_due';
