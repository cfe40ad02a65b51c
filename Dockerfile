# The gateway, serving on port 8080. Set DATABASE_URL (a real PostgreSQL) and
# OPENROUTER_API_KEY; without DATABASE_URL it falls back to the embedded PostgreSQL.

# Build the wheel; it carries sql/ and config/ inside the package (pyproject.toml).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY bench ./bench
COPY sql ./sql
COPY config ./config
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Install the wheel alone: no source tree in the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --create-home --home-dir /app gateway

# The relative defaults (.data/postgres, .data/usage-spool) land in the gateway's home.
WORKDIR /app
USER gateway
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
CMD ["python", "-m", "gateway", "serve"]
