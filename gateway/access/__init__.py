"""Who may use the proxy: keys, organizations, the entitlement rule, the facts cache."""
