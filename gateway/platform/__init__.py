"""What every layer stands on: the database, migrations, logs, metrics, aiohttp's internals."""
