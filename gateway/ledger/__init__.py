"""Usage charges: recorded once, written in batches, spooled to disk when the database is away."""
