-- Annual billing: purchases are monthly or yearly. Every purchase made before this
-- migration was monthly, so the default backfills existing customers.
ALTER TABLE organization_seats_purchases
    ADD COLUMN billing_cycle text NOT NULL DEFAULT 'monthly'
        CHECK (billing_cycle IN ('monthly', 'yearly'));
