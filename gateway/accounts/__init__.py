"""Organizations, invitations, billing through Stripe, emails and reports."""
