"""`config.from_env`: defaults from config/defaults.toml, overrides from the environment,
and a `ConfigError` naming the variable for every bad value.

Each test passes its own environment mapping; none reads or changes `os.environ`.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import (
    DEFAULTS_FILE,
    PROJECT_ROOT,
    SETTINGS,
    Config,
    ConfigError,
    EnforcementMode,
    from_env,
)

API_KEY = "sk-or-v1-unit-test-key-that-must-never-be-printed-4f1c"


def env(**overrides: str) -> dict[str, str]:
    """The smallest valid environment (only the upstream key), with overrides."""
    return {"OPENROUTER_API_KEY": API_KEY, **overrides}


class TestDefaults:
    """With only the required key set, every setting comes from config/defaults.toml."""

    @pytest.mark.parametrize(
        ("field", "expected"),
        [
            ("openrouter_base_url", "https://openrouter.ai/api/v1"),
            ("openrouter_api_key", API_KEY),
            ("database_url", None),
            ("host", "0.0.0.0"),
            ("port", 8080),
            # No DATABASE_URL: the embedded set-up, whose links open its own pages.
            ("app_url", "http://localhost:8080"),
            ("trial_days", 30),
            ("entitlement_cache_ttl_seconds", 30.0),
            ("negative_cache_ttl_seconds", 5.0),
            ("enforcement_mode", EnforcementMode.ENFORCE),
            ("log_level", "info"),
            ("upstream_timeout_seconds", 120.0),
            ("upstream_idle_timeout_seconds", 300.0),
            ("max_body_bytes", 10_485_760),
            ("database_pool_min_size", 1),
            ("database_pool_max_size", 10),
            ("database_query_timeout_seconds", 5.0),
            ("auto_migrate", True),
            ("shutdown_timeout_seconds", 30.0),
            ("past_due_grace_days", 14),
            ("embedded_data_dir", Path(".data/postgres")),
            ("enterprise_organization_ids", ()),
        ],
    )
    def test_default(self, field: str, expected: object):
        """Each setting has its documented default when the environment does not set it."""
        value = getattr(from_env(env()), field)
        assert value == expected
        assert type(value) is type(expected)

    def test_defaults_file_is_the_projects(self):
        """Run from the checkout, the defaults come from config/defaults.toml at its top (a
        wheel carries that file inside the package: tests/test_wheel.py)."""
        assert DEFAULTS_FILE.parts[-2:] == ("config", "defaults.toml")
        assert DEFAULTS_FILE.resolve() == (PROJECT_ROOT / "config" / "defaults.toml").resolve()
        assert DEFAULTS_FILE.is_file()

    @pytest.mark.parametrize("blank", ["", " ", "\t\n"])
    def test_blank_value_falls_back_to_default(self, blank: str):
        """A variable set to blank counts as unset and takes the file's default."""
        config = from_env(env(GATEWAY_PORT=blank, TRIAL_DAYS=blank, ENFORCEMENT_MODE=blank))
        assert (config.port, config.trial_days) == (8080, 30)
        assert config.enforcement_mode is EnforcementMode.ENFORCE


class TestOverrides:
    """An environment variable always wins over the file."""

    @pytest.mark.parametrize(
        ("variable", "raw", "field", "expected"),
        [
            ("GATEWAY_PORT", "9090", "port", 9090),
            ("GATEWAY_PORT", " 9090 ", "port", 9090),
            ("GATEWAY_PORT", "0", "port", 0),
            ("GATEWAY_PORT", "65535", "port", 65535),
            ("GATEWAY_HOST", "127.0.0.1", "host", "127.0.0.1"),
            ("TRIAL_DAYS", "14", "trial_days", 14),
            ("TRIAL_DAYS", "0", "trial_days", 0),
            ("TRIAL_DAYS", "3650", "trial_days", 3650),
            ("PAST_DUE_GRACE_DAYS", "7", "past_due_grace_days", 7),
            ("PAST_DUE_GRACE_DAYS", "0", "past_due_grace_days", 0),
            ("PAST_DUE_GRACE_DAYS", "90", "past_due_grace_days", 90),
            ("ENTITLEMENT_CACHE_TTL_SECONDS", "2.5", "entitlement_cache_ttl_seconds", 2.5),
            ("NEGATIVE_CACHE_TTL_SECONDS", "1", "negative_cache_ttl_seconds", 1.0),
            ("ENFORCEMENT_MODE", "shadow", "enforcement_mode", EnforcementMode.SHADOW),
            ("ENFORCEMENT_MODE", "off", "enforcement_mode", EnforcementMode.OFF),
            ("ENFORCEMENT_MODE", "ENFORCE", "enforcement_mode", EnforcementMode.ENFORCE),
            ("ENFORCEMENT_MODE", " Shadow ", "enforcement_mode", EnforcementMode.SHADOW),
            ("LOG_LEVEL", "debug", "log_level", "debug"),
            ("LOG_LEVEL", "WARNING", "log_level", "warning"),
            ("LOG_LEVEL", "error", "log_level", "error"),
            (
                "OPENROUTER_BASE_URL",
                "http://127.0.0.1:9999/api/v1",
                "openrouter_base_url",
                "http://127.0.0.1:9999/api/v1",
            ),
            (
                "OPENROUTER_BASE_URL",
                "https://openrouter.ai/api/v1/",
                "openrouter_base_url",
                "https://openrouter.ai/api/v1",
            ),
            ("APP_URL", "https://app.example.test/", "app_url", "https://app.example.test"),
            ("DATABASE_URL", "postgresql://db/gw", "database_url", "postgresql://db/gw"),
            ("UPSTREAM_TIMEOUT_SECONDS", "5", "upstream_timeout_seconds", 5.0),
            ("UPSTREAM_IDLE_TIMEOUT_SECONDS", "0.5", "upstream_idle_timeout_seconds", 0.5),
            ("MAX_BODY_BYTES", "1024", "max_body_bytes", 1024),
            ("DATABASE_POOL_MIN_SIZE", "0", "database_pool_min_size", 0),
            ("DATABASE_POOL_MAX_SIZE", "50", "database_pool_max_size", 50),
            ("DATABASE_QUERY_TIMEOUT_SECONDS", "0.25", "database_query_timeout_seconds", 0.25),
            ("SHUTDOWN_TIMEOUT_SECONDS", "0", "shutdown_timeout_seconds", 0.0),
            ("EMBEDDED_DATA_DIR", "/var/lib/gw", "embedded_data_dir", Path("/var/lib/gw")),
            *[("AUTO_MIGRATE", raw, "auto_migrate", True) for raw in ("1", "true", "yes", "on")],
            *[("AUTO_MIGRATE", raw, "auto_migrate", False) for raw in ("0", "false", "no", "off")],
            ("AUTO_MIGRATE", "FALSE", "auto_migrate", False),
            ("AUTO_MIGRATE", " Yes ", "auto_migrate", True),
        ],
    )
    def test_override(self, variable: str, raw: str, field: str, expected: object):
        """The variable's value, parsed and normalised, replaces the default."""
        value = getattr(from_env(env(**{variable: raw})), field)
        assert value == expected
        assert type(value) is type(expected)

    def test_config_file_from_environment(self, tmp_path: Path):
        """GATEWAY_CONFIG_FILE points at another defaults file, which env still overrides."""
        defaults = tmp_path / "staging.toml"
        defaults.write_text(
            '[env]\nOPENROUTER_BASE_URL = "https://staging.example.test/v1"\n'
            'GATEWAY_HOST = "::"\nGATEWAY_PORT = 7000\nAPP_URL = "https://staging.example.test"\n'
            "TRIAL_DAYS = 7\nENTITLEMENT_CACHE_TTL_SECONDS = 1\nNEGATIVE_CACHE_TTL_SECONDS = 1\n"
            'ENFORCEMENT_MODE = "shadow"\nLOG_LEVEL = "debug"\nUPSTREAM_TIMEOUT_SECONDS = 1\n'
            "UPSTREAM_IDLE_TIMEOUT_SECONDS = 1\nMAX_BODY_BYTES = 2048\n"
            "DATABASE_POOL_MIN_SIZE = 1\nDATABASE_POOL_MAX_SIZE = 2\n"
            "DATABASE_QUERY_TIMEOUT_SECONDS = 1\nAUTO_MIGRATE = false\n"
            'SHUTDOWN_TIMEOUT_SECONDS = 1\nEMBEDDED_DATA_DIR = "/tmp/pg"\n'
            '[migrations]\nenterprise_organization_ids = ["a", "b"]\n'
        )
        config = from_env(env(GATEWAY_CONFIG_FILE=str(defaults), TRIAL_DAYS="9"))
        assert config.openrouter_base_url == "https://staging.example.test/v1"
        assert config.enforcement_mode is EnforcementMode.SHADOW
        assert config.auto_migrate is False
        assert config.trial_days == 9
        assert config.enterprise_organization_ids == ("a", "b")


class TestBadValues:
    """A bad value fails at start with a ConfigError whose message names the variable."""

    @pytest.mark.parametrize(
        ("variable", "raw"),
        [
            pytest.param("OPENROUTER_API_KEY", None, id="api-key-missing"),
            pytest.param("OPENROUTER_API_KEY", "", id="api-key-empty"),
            pytest.param("OPENROUTER_API_KEY", "   ", id="api-key-blank"),
            pytest.param("GATEWAY_PORT", "abc", id="port-not-a-number"),
            pytest.param("GATEWAY_PORT", "80.5", id="port-fractional"),
            pytest.param("GATEWAY_PORT", "70000", id="port-too-high"),
            pytest.param("GATEWAY_PORT", "65536", id="port-one-too-high"),
            pytest.param("GATEWAY_PORT", "-1", id="port-negative"),
            pytest.param("ENFORCEMENT_MODE", "maybe", id="mode-unknown"),
            pytest.param("ENFORCEMENT_MODE", "enforcing", id="mode-misspelt"),
            pytest.param("OPENROUTER_BASE_URL", "ftp://x", id="base-url-ftp"),
            pytest.param("OPENROUTER_BASE_URL", "openrouter.ai/api/v1", id="base-url-no-scheme"),
            pytest.param("OPENROUTER_BASE_URL", "https://", id="base-url-no-host"),
            pytest.param("OPENROUTER_BASE_URL", "/api/v1", id="base-url-relative"),
            pytest.param("APP_URL", "mailto:billing@example.test", id="app-url-mailto"),
            pytest.param("TRIAL_DAYS", "-1", id="trial-days-negative"),
            pytest.param("TRIAL_DAYS", "3651", id="trial-days-too-many"),
            pytest.param("TRIAL_DAYS", "thirty", id="trial-days-word"),
            pytest.param("TRIAL_DAYS", "1.5", id="trial-days-fractional"),
            pytest.param("PAST_DUE_GRACE_DAYS", "-1", id="grace-days-negative"),
            pytest.param("PAST_DUE_GRACE_DAYS", "91", id="grace-days-too-many"),
            pytest.param("PAST_DUE_GRACE_DAYS", "two weeks", id="grace-days-words"),
            pytest.param("PAST_DUE_GRACE_DAYS", "1.5", id="grace-days-fractional"),
            pytest.param("AUTO_MIGRATE", "perhaps", id="auto-migrate-perhaps"),
            pytest.param("AUTO_MIGRATE", "2", id="auto-migrate-two"),
            pytest.param("LOG_LEVEL", "loud", id="log-level-loud"),
            pytest.param("LOG_LEVEL", "critical", id="log-level-critical"),
            pytest.param("ENTITLEMENT_CACHE_TTL_SECONDS", "0", id="cache-ttl-zero"),
            pytest.param("ENTITLEMENT_CACHE_TTL_SECONDS", "-5", id="cache-ttl-negative"),
            pytest.param("ENTITLEMENT_CACHE_TTL_SECONDS", "nan", id="cache-ttl-nan"),
            pytest.param("ENTITLEMENT_CACHE_TTL_SECONDS", "soon", id="cache-ttl-word"),
            pytest.param("NEGATIVE_CACHE_TTL_SECONDS", "0", id="negative-ttl-zero"),
            pytest.param("UPSTREAM_TIMEOUT_SECONDS", "0", id="upstream-timeout-zero"),
            pytest.param("MAX_BODY_BYTES", "1023", id="max-body-too-small"),
            pytest.param("DATABASE_POOL_MAX_SIZE", "0", id="pool-max-zero"),
            pytest.param("DATABASE_POOL_MIN_SIZE", "1001", id="pool-min-too-big"),
            pytest.param("SHUTDOWN_TIMEOUT_SECONDS", "-1", id="shutdown-negative"),
        ],
    )
    def test_bad_value_names_the_variable(self, variable: str, raw: str | None):
        """from_env raises ConfigError and the message names the offending variable."""
        values = env(**({variable: raw} if raw is not None else {}))
        if raw is None:
            del values[variable]
        with pytest.raises(ConfigError, match=variable):
            from_env(values)

    @pytest.mark.parametrize("raw", [None, "", "  "])
    def test_upstream_key_optional_for_commands_that_do_not_proxy(self, raw: str | None):
        """With need_upstream_key=False a missing key is allowed and read as empty."""
        values = {} if raw is None else {"OPENROUTER_API_KEY": raw}
        assert from_env(values, need_upstream_key=False).openrouter_api_key == ""

    def test_config_error_is_a_value_error(self):
        """ConfigError is a ValueError, so callers treating bad input generically catch it."""
        assert issubclass(ConfigError, ValueError)

    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param("https://openrouter.ai/api/v1?key=1", id="query"),
            pytest.param("https://openrouter.ai/api/v1#frag", id="fragment"),
        ],
    )
    def test_base_url_with_query_or_fragment_is_refused(self, raw: str):
        """A base URL that would swallow every request path fails at start, not per request."""
        with pytest.raises(ConfigError, match="OPENROUTER_BASE_URL"):
            from_env(env(OPENROUTER_BASE_URL=raw))


class TestSecretAndShape:
    """The configuration is one frozen object that never prints the upstream key."""

    def test_api_key_not_in_repr(self):
        """repr() and str() of the configuration leave out the upstream API key."""
        config = from_env(env())
        assert API_KEY not in repr(config)
        assert API_KEY not in str(config)
        assert "openrouter_api_key" not in repr(config)

    @pytest.mark.parametrize(
        "variable",
        [
            "DATABASE_URL",
            "DATABASE_LISTEN_URL",
            "SMTP_URL",
            "STRIPE_SECRET_KEY",
            "STRIPE_WEBHOOK_SECRET",
        ],
    )
    def test_other_secrets_not_in_repr(self, variable: str):
        """Stripe's secrets, and URLs that may carry a password, stay out of repr too."""
        secret = "pw-3f9a1c-never-printed"
        values = {
            "DATABASE_URL": f"postgresql://gw:{secret}@db/gw",
            "DATABASE_LISTEN_URL": f"postgresql://gw:{secret}@db/gw",
            "SMTP_URL": f"smtp://kilo:{secret}@mail.example.test",
        }
        config = from_env(env(**{variable: values.get(variable, secret)}))
        assert secret not in repr(config)

    def test_api_key_still_available(self):
        """The key is hidden from repr but readable by the proxy."""
        assert from_env(env()).openrouter_api_key == API_KEY

    def test_config_is_frozen(self):
        """A built configuration cannot be changed in place."""
        config = from_env(env())
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.port = 1  # type: ignore[misc]

    def test_env_mapping_is_not_read_from_process(self, monkeypatch: pytest.MonkeyPatch):
        """An explicit mapping is the whole environment; the process's is ignored."""
        monkeypatch.setenv("GATEWAY_PORT", "1234")
        monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
        assert from_env(env()).port == 8080

    def test_returns_config(self):
        """from_env returns a Config."""
        assert isinstance(from_env(env()), Config)


class TestStartUpValidation:
    """Everything from_env can check is checked there, so `serve` stops with one line."""

    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param("https://mail.example.test", id="not-smtp"),
            pytest.param("smtp://", id="no-host"),
            pytest.param("mail.example.test", id="no-scheme"),
            pytest.param("smtp://kilo:pw-8c1d@[::1", id="broken-ipv6"),
            pytest.param("smtp://kilo:pw-8c1d@mail.example.test:99999", id="port-out-of-range"),
        ],
    )
    def test_bad_smtp_url_is_refused_by_from_env(self, raw: str):
        """SMTP_URL is validated with the other settings, not later by create_app, and the
        message never repeats the URL's password."""
        with pytest.raises(ConfigError, match="SMTP_URL") as raised:
            from_env(env(SMTP_URL=raw))
        assert "pw-8c1d" not in str(raised.value)

    @pytest.mark.parametrize(
        "raw", ["smtp://mail.example.test", "smtps://kilo:pw@mail.example.test:4650"]
    )
    def test_good_smtp_url_is_kept(self, raw: str):
        assert from_env(env(SMTP_URL=raw)).smtp_url == raw

    def test_pool_min_above_max_is_refused(self):
        with pytest.raises(ConfigError, match="DATABASE_POOL_MIN_SIZE"):
            from_env(env(DATABASE_POOL_MIN_SIZE="20", DATABASE_POOL_MAX_SIZE="10"))

    def test_missing_config_file_names_the_variable(self, tmp_path: Path):
        with pytest.raises(ConfigError, match="GATEWAY_CONFIG_FILE"):
            from_env(env(GATEWAY_CONFIG_FILE=str(tmp_path / "absent.toml")))

    @pytest.mark.parametrize(
        "content",
        [
            pytest.param("[env\n", id="not-toml"),
            pytest.param("[env]\nGATEWAY_PROT = 1\n", id="unknown-setting"),
            pytest.param('[env]\nGATEWAY_CONFIG_FILE = "x.toml"\n', id="names-another-file"),
        ],
    )
    def test_bad_config_file_names_the_variable(self, tmp_path: Path, content: str):
        """A file that is not TOML, or sets what the gateway does not read (a typo)."""
        path = tmp_path / "staging.toml"
        path.write_text(content)
        with pytest.raises(ConfigError, match="GATEWAY_CONFIG_FILE"):
            from_env(env(GATEWAY_CONFIG_FILE=str(path)))

    def test_bad_value_in_config_file_names_the_setting(self, tmp_path: Path):
        path = tmp_path / "staging.toml"
        path.write_text('[env]\nGATEWAY_PORT = "eighty"\n')
        with pytest.raises(ConfigError, match="GATEWAY_PORT"):
            from_env(env(GATEWAY_CONFIG_FILE=str(path)))

    def test_config_file_is_recorded(self, tmp_path: Path):
        path = tmp_path / "staging.toml"
        path.write_text("[env]\nTRIAL_DAYS = 3\n")
        config = from_env(env(GATEWAY_CONFIG_FILE=f" {path} "))
        assert (config.config_file, config.trial_days) == (path, 3)
        assert from_env(env()).config_file is None

    def test_enterprise_ids_must_be_a_list(self, tmp_path: Path):
        path = tmp_path / "staging.toml"
        path.write_text('[migrations]\nenterprise_organization_ids = "one"\n')
        with pytest.raises(ConfigError, match="enterprise_organization_ids"):
            from_env(env(GATEWAY_CONFIG_FILE=str(path)))

    def test_serve_with_a_bad_setting_prints_one_line_and_exits_2(self, tmp_path: Path):
        """`python -m gateway serve` with a bad SMTP_URL: no traceback, a message naming it."""
        names = {s.name for s in SETTINGS} | {"PYTHONPATH", "PROMETHEUS_MULTIPROC_DIR"}
        child_env = {k: v for k, v in os.environ.items() if k not in names}
        child_env.update(
            OPENROUTER_API_KEY="sk-or-v1-config-test-key",
            DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
            SMTP_URL="https://mail.example.test",
            USAGE_SPOOL_DIR=str(tmp_path / "spool"),
        )
        finished = subprocess.run(
            [sys.executable, "-m", "gateway", "serve"],
            cwd=PROJECT_ROOT,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert finished.returncode == 2, finished.stderr
        lines = finished.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("gateway: configuration error: SMTP_URL")
        assert "Traceback" not in finished.stderr + finished.stdout
