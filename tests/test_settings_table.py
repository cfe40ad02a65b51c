"""One source for each fact about a setting, and README.md's tables checked against them.

`gateway.config.SETTINGS` (the `setting(...)` fields of `Config`) declares each variable's
type and bounds; `config/defaults.toml` holds every default and nothing else does;
README.md's configuration table says what each one means. These tests hold the three
together: the README lists exactly the settings, with the file's defaults, and every
bound the table declares is enforced at start with a message naming the variable.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

import pytest

from gateway import config
from gateway.config import SETTINGS, ConfigError, Setting, from_env, load_defaults

README = config.PROJECT_ROOT / "README.md"
API_KEY = "sk-or-v1-settings-table-test-key"
# The settings whose bounds depend on one another, set so each bound is tested alone.
ROOMY = {"DATABASE_POOL_MAX_SIZE": "1000"}
ROW = re.compile(r"^\| `(?P<name>[A-Z0-9_]+)` \| (?P<default>.*?) \| (?P<meaning>.*) \|$")
BY_NAME = {s.name: s for s in SETTINGS}
DEFAULTS: dict[str, Any] = load_defaults()["env"]


def env(**overrides: str) -> dict[str, str]:
    return {"OPENROUTER_API_KEY": API_KEY, **ROOMY, **overrides}


def rendered(value: Any) -> str:
    """A default as the README shows it: the value the environment would give."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def table_rows(section: str) -> list[re.Match[str]]:
    """The `| \\`NAME\\` | default | meaning |` rows of the first table under `section`."""
    text = README.read_text()
    start = text.index(f"\n{section}\n")
    lines = text[start:].splitlines()[2:]
    rows: list[re.Match[str]] = []
    in_table = False
    for line in lines:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            in_table = True
            match = ROW.match(line)
            if match:
                rows.append(match)
        elif in_table:
            break
    assert rows, f"no settings table under {section!r} in README.md"
    return rows


CONFIGURATION = table_rows("## Configuration")


def expected_default_cell(setting: Setting) -> str | None:
    """The README's default cell for a setting with a default, or 'required'; None when
    the setting is optional (its cell then says what unset means)."""
    if setting.name in DEFAULTS:
        return f"`{rendered(DEFAULTS[setting.name])}`"
    return "required" if setting.required else None


# --- the README lists exactly the settings, with the file's defaults ----------------------


def test_readme_lists_every_setting_once() -> None:
    """The configuration table names each setting once, and nothing else."""
    listed = [row["name"] for row in CONFIGURATION]
    assert sorted(listed) == sorted(BY_NAME), (
        f"missing from README.md: {sorted(set(BY_NAME) - set(listed))}; "
        f"not settings: {sorted(set(listed) - set(BY_NAME))}"
    )
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize("row", CONFIGURATION, ids=lambda row: row["name"])
def test_readme_default_is_the_files(row: re.Match[str]) -> None:
    """A default in the README is the one in config/defaults.toml; a setting without one
    says `required`, or `unset...` with what that means."""
    setting = BY_NAME[row["name"]]
    expected = expected_default_cell(setting)
    if expected is None:
        assert row["default"].startswith("unset"), row.group(0)
    else:
        assert row["default"] == expected
    assert row["meaning"].strip(), f"{setting.name} has no meaning in README.md"


def test_other_readme_tables_agree() -> None:
    """Any other settings table in the README (Stripe's) gives the same defaults."""
    rows = table_rows("## Stripe")
    for row in rows:
        setting = BY_NAME[row["name"]]
        expected = expected_default_cell(setting)
        if expected is None:
            assert row["default"].startswith("unset"), row.group(0)
        else:
            assert row["default"] == expected, row.group(0)


def test_defaults_named_in_readme_prose_are_the_files() -> None:
    """'`NAME` (default X)' in the README's text agrees with config/defaults.toml."""
    text = README.read_text()
    found = re.findall(r"`([A-Z0-9_]+)` \(default `?([^)`]+)`?\)", text)
    assert found, "the README mentions no '(default ...)'"
    for name, value in found:
        assert name in DEFAULTS, name
        assert value == rendered(DEFAULTS[name]), name


# --- every default declared once -----------------------------------------------------------


def test_every_setting_has_a_default_or_is_required_or_optional() -> None:
    """A setting without a default in the file is required (and says so when missing) or
    optional (None); the file sets nothing that is not a setting."""
    assert set(DEFAULTS) <= set(BY_NAME)
    for setting in SETTINGS:
        if setting.name in DEFAULTS:
            continue
        missing = {k: v for k, v in env().items() if k != setting.name}
        if setting.required:
            with pytest.raises(ConfigError, match=f"{setting.name} is required"):
                from_env(missing)
        else:
            assert getattr(from_env(missing), setting.field) is None


def test_the_dataclass_holds_no_defaults() -> None:
    """Config's fields have no default of their own: the file is the one source."""
    for field in dataclasses.fields(config.Config):
        assert field.default is dataclasses.MISSING, field.name
        assert field.default_factory is dataclasses.MISSING, field.name


def test_each_default_parses_to_the_fields_type() -> None:
    """Every default in the file is valid, and read as the type its field declares."""
    built = from_env({"OPENROUTER_API_KEY": API_KEY})
    hints = typing.get_type_hints(config.Config)
    for setting in SETTINGS:
        if setting.name in DEFAULTS:
            value = getattr(built, setting.field)
            assert isinstance(value, runtime_types(hints[setting.field])), setting.name


def runtime_types(hint: Any) -> tuple[type, ...]:
    """What isinstance can check for a field annotation (`str | None`, `tuple[str, ...]`)."""
    if isinstance(hint, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in runtime_types(arg))
    return (typing.get_origin(hint) or hint,)


def test_every_field_of_the_config_is_a_setting_or_a_file() -> None:
    """Every field comes from a setting, but the two read from files."""
    fields = {f.name for f in dataclasses.fields(config.Config)}
    assert fields - {s.field for s in SETTINGS} == {"enterprise_organization_ids", "catalog"}


# --- every bound is enforced, naming the variable -----------------------------------------


def just_outside(setting: Setting, bound: float, direction: float) -> str:
    if setting.parse is config.whole:
        return str(int(bound + direction))
    return repr(math.nextafter(bound, direction * math.inf))


LOWS = [s for s in SETTINGS if s.low is not None]
HIGHS = [s for s in SETTINGS if s.high is not None]
CHOICES = [s for s in SETTINGS if s.choices]


def test_numbers_have_bounds() -> None:
    """Every number has a lower bound (a negative count or duration is never meant)."""
    numbers = [s for s in SETTINGS if s.parse in (config.whole, config.number)]
    assert numbers and all(s.low is not None for s in numbers)
    assert all(s.parse is not config.whole or s.high is not None for s in numbers)


@pytest.mark.parametrize("setting", LOWS, ids=lambda s: s.name)
def test_below_the_low_bound_is_refused(setting: Setting) -> None:
    assert setting.low is not None
    with pytest.raises(ConfigError, match=setting.name):
        from_env(env(**{setting.name: just_outside(setting, setting.low, -1)}))


@pytest.mark.parametrize("setting", LOWS, ids=lambda s: s.name)
def test_the_low_bound_itself_is_accepted(setting: Setting) -> None:
    assert setting.low is not None
    value = getattr(from_env(env(**{setting.name: str(setting.low)})), setting.field)
    assert value == setting.low


@pytest.mark.parametrize("setting", HIGHS, ids=lambda s: s.name)
def test_above_the_high_bound_is_refused(setting: Setting) -> None:
    assert setting.high is not None
    with pytest.raises(ConfigError, match=setting.name):
        from_env(env(**{setting.name: just_outside(setting, setting.high, +1)}))


@pytest.mark.parametrize("setting", HIGHS, ids=lambda s: s.name)
def test_the_high_bound_itself_is_accepted(setting: Setting) -> None:
    assert setting.high is not None
    raw = str(int(setting.high)) if setting.parse is config.whole else str(setting.high)
    assert getattr(from_env(env(**{setting.name: raw})), setting.field) == setting.high


@pytest.mark.parametrize("setting", LOWS, ids=lambda s: s.name)
@pytest.mark.parametrize("raw", ["many", "nan", "1e", "0x10"])
def test_a_number_that_is_not_one_is_refused(setting: Setting, raw: str) -> None:
    with pytest.raises(ConfigError, match=setting.name):
        from_env(env(**{setting.name: raw}))


@pytest.mark.parametrize("setting", CHOICES, ids=lambda s: s.name)
def test_a_choice_outside_the_list_is_refused(setting: Setting) -> None:
    with pytest.raises(ConfigError, match=setting.name):
        from_env(env(**{setting.name: "none-of-these"}))
    for choice in setting.choices:
        assert getattr(from_env(env(**{setting.name: choice.upper()})), setting.field) == choice


@pytest.mark.parametrize(
    "setting", [s for s in SETTINGS if s.parse is config.http_url], ids=lambda s: s.name
)
@pytest.mark.parametrize("raw", ["ftp://x", "no-scheme", "https://", "http://[::1", "http://h/?q"])
def test_a_url_that_is_not_http_is_refused(setting: Setting, raw: str) -> None:
    with pytest.raises(ConfigError, match=setting.name):
        from_env(env(**{setting.name: raw}))


@pytest.mark.parametrize(
    "setting", [s for s in SETTINGS if s.parse is config.flag], ids=lambda s: s.name
)
def test_a_flag_that_is_not_true_or_false_is_refused(setting: Setting) -> None:
    with pytest.raises(ConfigError, match=setting.name):
        from_env(env(**{setting.name: "maybe"}))
