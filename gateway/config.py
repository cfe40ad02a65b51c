"""Configuration: built once at start from the environment over `config/defaults.toml`.

Every setting is an environment variable, declared once, as a field of `Config` with
`setting(...)`: its variable, type (the parser) and bounds. Its default is in `config/defaults.toml`
and nowhere else: a setting without one there is required, or None when unset. What each
one means is README.md's configuration table, which tests/test_settings_table.py checks
against both. A bad value fails at start with a `ConfigError` naming the variable.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from aiohttp import web
from yarl import URL

from gateway.plans import PROJECT_ROOT as PROJECT_ROOT
from gateway.plans import Catalog, load_catalog, shipped_dir

DEFAULTS_FILE = shipped_dir("gateway.config_files") / "defaults.toml"
CONFIG_FILE_VARIABLE = "GATEWAY_CONFIG_FILE"
UPSTREAM_KEY_VARIABLE = "OPENROUTER_API_KEY"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class EnforcementMode(StrEnum):
    ENFORCE = "enforce"  # refuse blocked organizations with 402
    SHADOW = "shadow"  # let them through, flag with X-Gateway-Would-Block and count
    OFF = "off"  # no entitlement checks at all (keys and membership still checked)


LOG_LEVELS = ("debug", "info", "warning", "error")
Parser = Callable[["Setting", str], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable: how it is read and its bounds (README.md says what it means)."""

    name: str
    parse: Parser  # from the stripped, non-blank value to the field's value
    low: float | None = None  # inclusive bounds of a number
    high: float | None = None
    choices: tuple[str, ...] = ()
    required: bool = True  # else None when neither the environment nor a file sets it
    field: str = ""  # its `Config` field (filled in below)


def text(setting: Setting, raw: str) -> str:
    return raw


def whole(setting: Setting, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{setting.name} must be a whole number, got {raw!r}") from None
    return _bounded(setting, value, raw)


def number(setting: Setting, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{setting.name} must be a number, got {raw!r}") from None
    return _bounded(setting, value, raw)


def _bounded(setting: Setting, value: Any, raw: str) -> Any:
    low, high = setting.low, setting.high
    # `not >=` and `not <=`, so that nan is out of every range.
    if low is not None and high is not None and not low <= value <= high:
        raise ConfigError(f"{setting.name} must be between {low} and {high}, got {raw}")
    if low is not None and not value >= low:
        raise ConfigError(f"{setting.name} must be at least {low}, got {raw}")
    if high is not None and not value <= high:
        raise ConfigError(f"{setting.name} must be at most {high}, got {raw}")
    return value


def flag(setting: Setting, raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{setting.name} must be true or false, got {raw.lower()!r}")


def choice(setting: Setting, raw: str) -> str:
    if raw.lower() not in setting.choices:
        listed = ", ".join(setting.choices)
        raise ConfigError(f"{setting.name} must be one of {listed}, got {raw.lower()!r}")
    return raw.lower()


def mode(setting: Setting, raw: str) -> EnforcementMode:
    return EnforcementMode(choice(setting, raw))


def http_url(setting: Setting, raw: str) -> str:
    """An http(s) URL with a host and nothing after its path, without a trailing slash."""
    try:
        url = URL(raw)
    except ValueError as exc:
        raise ConfigError(f"{setting.name} must be an http(s) URL, got {raw!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{setting.name} must be an http(s) URL with a host, got {raw!r}")
    if url.raw_query_string or url.raw_fragment or "?" in raw or "#" in raw:
        raise ConfigError(f"{setting.name} must not have a query or fragment, got {raw!r}")
    return str(url).rstrip("/")


SMTP_DEFAULT_PORTS = {"smtp": 25, "smtps": 465}


@dataclasses.dataclass(frozen=True, slots=True)
class SmtpSettings:
    """Where and how the mailer delivers, parsed from `SMTP_URL`."""

    hostname: str
    port: int
    use_tls: bool
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)


def parse_smtp_url(url: str) -> SmtpSettings:
    """`smtp://user:password@host:port` or `smtps://…`; ConfigError naming SMTP_URL otherwise."""
    parsed = URL(url)
    if parsed.scheme not in SMTP_DEFAULT_PORTS or not parsed.host:
        raise ConfigError("SMTP_URL must look like smtp://user:password@host:port or smtps://…")
    return SmtpSettings(
        hostname=parsed.host,
        port=parsed.explicit_port or SMTP_DEFAULT_PORTS[parsed.scheme],
        use_tls=parsed.scheme == "smtps",
        username=parsed.user or None,
        password=parsed.password or None,
    )


def smtp(setting: Setting, raw: str) -> str:
    """Checked here, at start; the mailer parses it again when it starts."""
    try:
        parse_smtp_url(raw)
    except ConfigError:
        raise
    except ValueError as exc:  # never the value itself: it may hold a password
        raise ConfigError(f"{setting.name} is not a valid URL: {exc}") from None
    return raw


def names(setting: Setting, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


# The paths whose responses report usage; METERED_PATHS may name these, or "none" (an
# empty value means the default, as for every setting).
METERABLE_PATHS = ("chat/completions", "completions")


def metered(setting: Setting, raw: str) -> tuple[str, ...]:
    if raw.strip().lower() == "none":
        return ()
    paths = names(setting, raw)
    unknown = sorted(set(paths) - set(METERABLE_PATHS))
    if unknown:
        raise ConfigError(
            f"{setting.name} may name only {', '.join(METERABLE_PATHS)}; got {', '.join(unknown)}"
        )
    return paths


def fs_path(setting: Setting, raw: str) -> Path:
    return Path(raw)


def setting(name: str, parse: Parser, *, secret: bool = False, **bounds: Any) -> Any:
    """A `Config` field read from the variable `name`; a secret is kept out of repr."""
    return dataclasses.field(repr=not secret, metadata={"setting": Setting(name, parse, **bounds)})


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Everything the gateway needs to know, validated; passed to `create_app`."""

    # From the [migrations] section of the defaults file, and from config/plans.toml.
    enterprise_organization_ids: tuple[str, ...]
    catalog: Catalog = dataclasses.field(repr=False)
    # The settings, in README.md's order (RUF009: `setting` returns a dataclasses.field).
    # Secrets, and URLs that may hold a password, stay out of repr.
    database_url: str | None = setting("DATABASE_URL", text, required=False, secret=True)
    database_listen_url: str | None = setting(
        "DATABASE_LISTEN_URL", text, required=False, secret=True
    )
    embedded_data_dir: Path = setting("EMBEDDED_DATA_DIR", fs_path)  # noqa: RUF009
    openrouter_base_url: str = setting("OPENROUTER_BASE_URL", http_url)
    openrouter_api_key: str = setting(UPSTREAM_KEY_VARIABLE, text, secret=True)
    host: str = setting("GATEWAY_HOST", text)
    port: int = setting("GATEWAY_PORT", whole, low=0, high=65535)
    app_url: str = setting("APP_URL", http_url)
    trial_days: int = setting("TRIAL_DAYS", whole, low=0, high=3650)
    past_due_grace_days: int = setting("PAST_DUE_GRACE_DAYS", whole, low=0, high=90)
    entitlement_cache_ttl_seconds: float = setting(
        "ENTITLEMENT_CACHE_TTL_SECONDS", number, low=0.001
    )
    negative_cache_ttl_seconds: float = setting("NEGATIVE_CACHE_TTL_SECONDS", number, low=0.001)
    stale_if_error_seconds: float = setting("STALE_IF_ERROR_SECONDS", number, low=0)
    enforcement_mode: EnforcementMode = setting(  # noqa: RUF009
        "ENFORCEMENT_MODE", mode, choices=tuple(EnforcementMode)
    )
    log_level: str = setting("LOG_LEVEL", choice, choices=LOG_LEVELS)
    upstream_timeout_seconds: float = setting("UPSTREAM_TIMEOUT_SECONDS", number, low=0.001)
    upstream_idle_timeout_seconds: float = setting(
        "UPSTREAM_IDLE_TIMEOUT_SECONDS", number, low=0.001
    )
    max_body_bytes: int = setting("MAX_BODY_BYTES", whole, low=1024, high=1 << 31)
    proxy_allowed_paths: tuple[str, ...] = setting("PROXY_ALLOWED_PATHS", names)
    metered_paths: tuple[str, ...] = setting("METERED_PATHS", metered)
    header_timeout_seconds: float = setting("HEADER_TIMEOUT_SECONDS", number, low=0.01)
    body_timeout_seconds: float = setting("BODY_TIMEOUT_SECONDS", number, low=0.01)
    database_pool_min_size: int = setting("DATABASE_POOL_MIN_SIZE", whole, low=0, high=1000)
    database_pool_max_size: int = setting("DATABASE_POOL_MAX_SIZE", whole, low=1, high=1000)
    database_query_timeout_seconds: float = setting(
        "DATABASE_QUERY_TIMEOUT_SECONDS", number, low=0.01
    )
    database_max_pending_queries: int = setting(
        "DATABASE_MAX_PENDING_QUERIES", whole, low=1, high=100_000
    )
    usage_flush_interval_seconds: float = setting("USAGE_FLUSH_INTERVAL_SECONDS", number, low=0.001)
    usage_batch_size: int = setting("USAGE_BATCH_SIZE", whole, low=1, high=100_000)
    usage_max_pending: int = setting("USAGE_MAX_PENDING", whole, low=2, high=10_000_000)
    usage_spool_dir: Path = setting("USAGE_SPOOL_DIR", fs_path)  # noqa: RUF009
    stripe_secret_key: str | None = setting("STRIPE_SECRET_KEY", text, required=False, secret=True)
    stripe_webhook_secret: str | None = setting(
        "STRIPE_WEBHOOK_SECRET", text, required=False, secret=True
    )
    stripe_api_base: str = setting("STRIPE_API_BASE", http_url)
    monthly_plan_enabled: bool = setting("MONTHLY_PLAN_ENABLED", flag)
    sales_email: str = setting("SALES_EMAIL", text)
    email_from: str = setting("EMAIL_FROM", text)
    smtp_url: str | None = setting("SMTP_URL", smtp, required=False, secret=True)
    invitation_ttl_days: int = setting("INVITATION_TTL_DAYS", whole, low=1, high=365)
    session_ttl_hours: float = setting("SESSION_TTL_HOURS", number, low=0.001, high=24 * 90)
    sign_in_link_ttl_minutes: float = setting(
        "SIGN_IN_LINK_TTL_MINUTES", number, low=0.01, high=24 * 60
    )
    default_model: str = setting("DEFAULT_MODEL", text)
    default_free_model: str = setting("DEFAULT_FREE_MODEL", text)
    models_cache_ttl_seconds: float = setting("MODELS_CACHE_TTL_SECONDS", number, low=0.001)
    trial_reminder_interval_seconds: float = setting(
        "TRIAL_REMINDER_INTERVAL_SECONDS", number, low=0.01
    )
    email_poll_interval_seconds: float = setting("EMAIL_POLL_INTERVAL_SECONDS", number, low=0.01)
    auto_migrate: bool = setting("AUTO_MIGRATE", flag)
    shutdown_timeout_seconds: float = setting("SHUTDOWN_TIMEOUT_SECONDS", number, low=0)
    config_file: Path | None = setting(CONFIG_FILE_VARIABLE, fs_path, required=False)  # noqa: RUF009

    @property
    def stripe_configured(self) -> bool:
        """True when the billing endpoints can talk to Stripe."""
        return bool(self.stripe_secret_key)


SETTINGS: tuple[Setting, ...] = tuple(
    dataclasses.replace(field.metadata["setting"], field=field.name)
    for field in dataclasses.fields(Config)
    if "setting" in field.metadata
)
# What a defaults file may set: every setting but the one that names the file.
FILE_SETTINGS = frozenset(s.name for s in SETTINGS) - {CONFIG_FILE_VARIABLE}


def load_defaults(path: Path | None = None, variable: str = "") -> dict[str, Any]:
    """Read a defaults file (`config/defaults.toml` unless `path`); a ConfigError names
    the file, and `variable` when that is where the file's name came from."""
    path = path or DEFAULTS_FILE
    where = f"{variable} ({path})" if variable else str(path)
    try:
        with path.open("rb") as f:
            file = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where} cannot be read: {exc}") from None
    unknown = sorted(set(file.get("env", {})) - FILE_SETTINGS)
    if unknown:
        raise ConfigError(f"{where} sets {', '.join(unknown)}, which the gateway does not read")
    return file


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
    overlay_name = _value(env, {}, CONFIG_FILE_VARIABLE)
    if overlay_name is not None:
        # Another file (staging, a test) overrides only the settings it names.
        overlay = load_defaults(Path(overlay_name), CONFIG_FILE_VARIABLE)
        for section, overrides in overlay.items():
            file.setdefault(section, {}).update(overrides)
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = _value(env, file.get("env", {}), s.name)
        if raw is not None:
            values[s.field] = s.parse(s, raw)
        elif s.name == UPSTREAM_KEY_VARIABLE and not need_upstream_key:
            values[s.field] = ""
        elif s.required:
            raise ConfigError(f"{s.name} is required but not set")
        else:
            values[s.field] = None
    if values["database_pool_min_size"] > values["database_pool_max_size"]:
        raise ConfigError("DATABASE_POOL_MIN_SIZE must not be above DATABASE_POOL_MAX_SIZE")
    if values["database_url"] is None and _value(env, {}, "APP_URL") is None:
        # The embedded set-up serves its own pages: links point at this gateway.
        values["app_url"] = own_url(values["host"], values["port"])
    enterprise = file.get("migrations", {}).get("enterprise_organization_ids", [])
    if not isinstance(enterprise, list):
        raise ConfigError("[migrations] enterprise_organization_ids must be a list of ids")
    return Config(
        **values,
        enterprise_organization_ids=tuple(str(i) for i in enterprise),
        catalog=load_catalog(),
    )


def own_url(host: str, port: int) -> str:
    """This gateway's own address, as a browser on the same machine reaches it."""
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def _value(env: Mapping[str, str], defaults: Mapping[str, Any], name: str) -> str | None:
    """The variable's value, stripped; blank counts as unset and takes the file's default."""
    value = env.get(name)
    if value is not None and value.strip() != "":
        return value.strip()
    default = defaults.get(name)
    if default is None:
        return None
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


# The application's configuration (`app[CONFIG]`).
CONFIG = web.AppKey("config", Config)
