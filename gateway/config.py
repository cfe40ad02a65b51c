"""Configuration: built once at start from the environment over `config/defaults.toml`.

Every setting is an environment variable; the file only supplies defaults. A bad value
fails at start with a `ConfigError` that names the variable, never later on a request.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from yarl import URL

from gateway.plans import Catalog, load_catalog

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = PROJECT_ROOT / "config" / "defaults.toml"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class EnforcementMode(StrEnum):
    ENFORCE = "enforce"  # refuse blocked organizations with 402
    SHADOW = "shadow"  # let them through, flag with X-Gateway-Would-Block and count
    OFF = "off"  # no entitlement checks at all (keys and membership still checked)


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Everything the gateway needs to know, validated; passed to `create_app`."""

    database_url: str | None
    # LISTEN needs a session of its own: behind PgBouncer in transaction mode, point this
    # at PostgreSQL directly. Unset: the same as database_url.
    database_listen_url: str | None
    openrouter_base_url: str  # no trailing slash
    openrouter_api_key: str = dataclasses.field(repr=False)
    host: str
    port: int
    app_url: str
    trial_days: int
    entitlement_cache_ttl_seconds: float
    negative_cache_ttl_seconds: float
    stale_if_error_seconds: float
    enforcement_mode: EnforcementMode
    log_level: str
    upstream_timeout_seconds: float
    upstream_idle_timeout_seconds: float
    max_body_bytes: int
    proxy_allowed_paths: tuple[str, ...]
    header_timeout_seconds: float
    body_timeout_seconds: float
    database_pool_min_size: int
    database_pool_max_size: int
    database_query_timeout_seconds: float
    database_max_pending_queries: int
    auto_migrate: bool
    shutdown_timeout_seconds: float
    embedded_data_dir: Path
    usage_flush_interval_seconds: float
    usage_batch_size: int
    usage_max_pending: int
    usage_spool_dir: Path
    stripe_secret_key: str | None = dataclasses.field(default=None, repr=False)
    stripe_webhook_secret: str | None = dataclasses.field(default=None, repr=False)
    stripe_api_base: str = "https://api.stripe.com"
    monthly_plan_enabled: bool = False
    sales_email: str = "sales@kilocode.ai"
    email_from: str = "Kilo Code <hello@kilocode.ai>"
    smtp_url: str | None = dataclasses.field(default=None, repr=False)
    invitation_ttl_days: int = 7
    default_model: str = "anthropic/claude-sonnet-4.5"
    default_free_model: str = "meta-llama/llama-3.3-70b-instruct:free"
    models_cache_ttl_seconds: float = 300.0
    trial_reminder_interval_seconds: float = 3600.0
    email_poll_interval_seconds: float = 1.0
    enterprise_organization_ids: tuple[str, ...] = ()
    catalog: Catalog = dataclasses.field(default_factory=load_catalog, repr=False)

    @property
    def stripe_configured(self) -> bool:
        """True when the billing endpoints can talk to Stripe."""
        return bool(self.stripe_secret_key)


def load_defaults(path: Path | None = None) -> dict[str, Any]:
    """Read the defaults file (`GATEWAY_CONFIG_FILE` or `config/defaults.toml`)."""
    with (path or DEFAULTS_FILE).open("rb") as f:
        return tomllib.load(f)


def from_env(
    env: Mapping[str, str] | None = None,
    defaults_path: Path | None = None,
    *,
    need_upstream_key: bool = True,
) -> Config:
    """Build the configuration from `env` (default: the process environment).

    Commands that never call the upstream (migrate, create-key) pass
    `need_upstream_key=False`.
    """
    env = os.environ if env is None else env
    file = load_defaults(defaults_path)
    if env.get("GATEWAY_CONFIG_FILE"):
        # Another file (staging, a test) overrides only the settings it names.
        overlay = load_defaults(Path(env["GATEWAY_CONFIG_FILE"]))
        for section, values in overlay.items():
            file.setdefault(section, {}).update(values)
    reader = _Reader(env, file.get("env", {}))
    return Config(
        database_url=reader.optional_str("DATABASE_URL"),
        database_listen_url=reader.optional_str("DATABASE_LISTEN_URL"),
        openrouter_base_url=str(reader.http_url("OPENROUTER_BASE_URL")).rstrip("/"),
        openrouter_api_key=(
            reader.required_str("OPENROUTER_API_KEY")
            if need_upstream_key
            else reader.optional_str("OPENROUTER_API_KEY") or ""
        ),
        host=reader.required_str("GATEWAY_HOST"),
        port=reader.int("GATEWAY_PORT", low=0, high=65535),
        app_url=str(reader.http_url("APP_URL")).rstrip("/"),
        trial_days=reader.int("TRIAL_DAYS", low=0, high=3650),
        entitlement_cache_ttl_seconds=reader.float("ENTITLEMENT_CACHE_TTL_SECONDS", low=0.001),
        negative_cache_ttl_seconds=reader.float("NEGATIVE_CACHE_TTL_SECONDS", low=0.001),
        stale_if_error_seconds=reader.float("STALE_IF_ERROR_SECONDS", low=0),
        enforcement_mode=reader.choice("ENFORCEMENT_MODE", EnforcementMode),
        log_level=reader.one_of("LOG_LEVEL", LOG_LEVELS),
        upstream_timeout_seconds=reader.float("UPSTREAM_TIMEOUT_SECONDS", low=0.001),
        upstream_idle_timeout_seconds=reader.float("UPSTREAM_IDLE_TIMEOUT_SECONDS", low=0.001),
        max_body_bytes=reader.int("MAX_BODY_BYTES", low=1024, high=1 << 31),
        proxy_allowed_paths=tuple(
            p.strip() for p in reader.required_str("PROXY_ALLOWED_PATHS").split(",") if p.strip()
        ),
        header_timeout_seconds=reader.float("HEADER_TIMEOUT_SECONDS", low=0.01),
        body_timeout_seconds=reader.float("BODY_TIMEOUT_SECONDS", low=0.01),
        database_pool_min_size=reader.int("DATABASE_POOL_MIN_SIZE", low=0, high=1000),
        database_pool_max_size=reader.int("DATABASE_POOL_MAX_SIZE", low=1, high=1000),
        database_query_timeout_seconds=reader.float("DATABASE_QUERY_TIMEOUT_SECONDS", low=0.01),
        database_max_pending_queries=reader.int(
            "DATABASE_MAX_PENDING_QUERIES", low=1, high=100_000
        ),
        auto_migrate=reader.bool("AUTO_MIGRATE"),
        shutdown_timeout_seconds=reader.float("SHUTDOWN_TIMEOUT_SECONDS", low=0),
        embedded_data_dir=Path(reader.required_str("EMBEDDED_DATA_DIR")),
        usage_flush_interval_seconds=reader.float("USAGE_FLUSH_INTERVAL_SECONDS", low=0.001),
        usage_batch_size=reader.int("USAGE_BATCH_SIZE", low=1, high=100_000),
        usage_max_pending=reader.int("USAGE_MAX_PENDING", low=2, high=10_000_000),
        usage_spool_dir=Path(reader.required_str("USAGE_SPOOL_DIR")),
        stripe_secret_key=reader.optional_str("STRIPE_SECRET_KEY"),
        stripe_webhook_secret=reader.optional_str("STRIPE_WEBHOOK_SECRET"),
        stripe_api_base=str(reader.http_url("STRIPE_API_BASE")).rstrip("/"),
        monthly_plan_enabled=reader.bool("MONTHLY_PLAN_ENABLED"),
        sales_email=reader.required_str("SALES_EMAIL"),
        email_from=reader.required_str("EMAIL_FROM"),
        smtp_url=reader.optional_str("SMTP_URL"),
        invitation_ttl_days=reader.int("INVITATION_TTL_DAYS", low=1, high=365),
        default_model=reader.required_str("DEFAULT_MODEL"),
        default_free_model=reader.required_str("DEFAULT_FREE_MODEL"),
        models_cache_ttl_seconds=reader.float("MODELS_CACHE_TTL_SECONDS", low=0.001),
        trial_reminder_interval_seconds=reader.float("TRIAL_REMINDER_INTERVAL_SECONDS", low=0.01),
        email_poll_interval_seconds=reader.float("EMAIL_POLL_INTERVAL_SECONDS", low=0.01),
        enterprise_organization_ids=tuple(
            str(i) for i in file.get("migrations", {}).get("enterprise_organization_ids", [])
        ),
        catalog=load_catalog(),
    )


class _Reader:
    """Reads one variable at a time from the environment, falling back to the file."""

    def __init__(self, env: Mapping[str, str], defaults: Mapping[str, Any]) -> None:
        self._env = env
        self._defaults = defaults

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is not None and value.strip() != "":
            return value.strip()
        default = self._defaults.get(name)
        if default is None:
            return None
        if isinstance(default, bool):
            return "true" if default else "false"
        return str(default)

    def optional_str(self, name: str) -> str | None:
        return self._raw(name)

    def required_str(self, name: str) -> str:
        value = self._raw(name)
        if value is None:
            raise ConfigError(f"{name} is required but not set")
        return value

    def int(self, name: str, *, low: int, high: int) -> int:
        raw = self.required_str(name)
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def float(self, name: str, *, low: float) -> float:
        raw = self.required_str(name)
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not value >= low:
            raise ConfigError(f"{name} must be at least {low}, got {raw}")
        return value

    def bool(self, name: str) -> bool:
        raw = self.required_str(name).lower()
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def one_of(self, name: str, choices: tuple[str, ...]) -> str:
        raw = self.required_str(name).lower()
        if raw not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw

    def choice(self, name: str, enum: type[EnforcementMode]) -> EnforcementMode:
        return enum(self.one_of(name, tuple(m.value for m in enum)))

    def http_url(self, name: str) -> URL:
        raw = self.required_str(name)
        url = URL(raw)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"{name} must be an http(s) URL with a host, got {raw!r}")
        if url.raw_query_string or url.raw_fragment or "?" in raw or "#" in raw:
            raise ConfigError(f"{name} must not have a query or fragment, got {raw!r}")
        return url
