# The gateway, serving on port 8080. Set DATABASE_URL (a real PostgreSQL) and
# OPENROUTER_API_KEY; without DATABASE_URL it falls back to the embedded PostgreSQL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY bench ./bench
COPY sql ./sql
COPY config ./config
# Editable, so the package finds sql/ and config/ beside it in /app.
RUN pip install --no-cache-dir -e . \
    && useradd --system --home-dir /app gateway \
    && chown -R gateway /app

USER gateway
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
CMD ["python", "-m", "gateway", "serve"]
