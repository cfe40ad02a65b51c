"""The proxy route: forwarding, the upstream client, metering and the model listings."""
