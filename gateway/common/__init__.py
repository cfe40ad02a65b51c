"""Small names every layer shares: the request context."""
