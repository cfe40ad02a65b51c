"""Serving: the connections, the proxy route's own fast path, the middleware, the runner."""
