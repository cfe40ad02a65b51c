"""What operators load: the Prometheus alerting rules, their unit tests and the Grafana
dashboard under deploy/.

promtool (Debian's `prometheus` package) checks and unit-tests the rules; a missing
promtool fails these tests rather than skipping them, so CI cannot pass without them.
Every metric a rule or a panel names must be one a running gateway exports at /metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningGateway

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway.json"
PROMTOOL_TIMEOUT_SECONDS = 30
DEADLINE_SECONDS = 2.0

# Names in PromQL that are not metrics: operators, modifiers and literals. Functions and
# aggregations are always followed by "(", which the extractor skips on its own.
PROMQL_WORDS = frozenset(
    {
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
        "group_right", "bool", "offset", "inf", "nan",
    }
)  # fmt: skip
# What a name cannot be: quoted strings (label values, regexes), label matchers, range
# and subquery durations, and the label lists of by/without/on/ignoring/group_*.
_NOT_NAMES = re.compile(
    r'"(?:[^"\\]|\\.)*"'
    r"|'(?:[^'\\]|\\.)*'"
    r"|\{[^}]*\}"
    r"|\[[^\]]*\]"
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
# An identifier not preceded by a name character or a digit (so not "5m" or "1e6").
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)


def promtool() -> str:
    """The promtool binary; fails the test (never skips) when it is not installed."""
    path = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if path is None:
        pytest.fail("promtool is not installed: apt-get install -y prometheus", pytrace=False)
    return path


def run_promtool(*args: str) -> None:
    """Run promtool in deploy/prometheus (rule files are named relative to it); fail with
    its output unless it exits 0."""
    done = subprocess.run(
        [promtool(), *args],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana target's) selects."""
    bare = _NOT_NAMES.sub(" ", promql)
    return {
        match.group(1)
        for match in _IDENTIFIER.finditer(bare)
        if match.group(2) is None and match.group(1) not in PROMQL_WORDS
    }


def rule_expressions(text: str) -> Iterator[tuple[str, str]]:
    """(alert name, expression) for every rule of a rules file.

    The project has no YAML parser, and promtool has already checked the file's shape: an
    `expr:` is a plain one-line value or a block scalar (`>-`, `|`) whose lines are
    indented deeper than the key.
    """
    name = "?"
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if found := re.match(r"\s*-\s*(?:alert|record):\s*(\S+)", line):
            name = found.group(1)
        found = re.match(r"(\s*)expr:\s*(.*)$", line)
        if found is None:
            continue
        indent, value = len(found.group(1)), found.group(2).strip()
        if value[:1] not in {">", "|"}:
            yield name, value
            continue
        block = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        yield name, " ".join(block)


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of the dashboard that shows data (rows, and panels inside collapsed
    rows, included; rows themselves are not)."""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def exported_names(exposition: str) -> set[str]:
    """Every sample name the Prometheus text exposition can carry, from its TYPE lines."""
    names: set[str] = set()
    for name, kind in _TYPE_LINE.findall(exposition):
        names.add(name)
        if kind == "counter":
            base = name.removesuffix("_total")
            names.update({base + "_total", base + "_created"})
        elif kind in {"histogram", "summary"}:
            names.update({name + "_bucket", name + "_sum", name + "_count", name + "_created"})
    return names


def used_names() -> dict[str, set[str]]:
    """Metric name -> where it is used ("alert X", "panel Y"), over the rules and the
    dashboard."""
    used: dict[str, set[str]] = {}
    for alert, expr in rule_expressions(RULES.read_text(encoding="utf-8")):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"alert {alert}")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            for name in metric_names(target.get("expr", "")):
                used.setdefault(name, set()).add(f"panel {panel.get('title')!r}")
    return used


def test_alert_rules_pass_promtool_check() -> None:
    """alerts.yml is a valid rules file: promtool check rules exits 0."""
    run_promtool("check", "rules", RULES.name)


def test_alert_rules_unit_tests_pass() -> None:
    """alerts_test.yml's cases (each alert tested fires on its input, stays quiet on the
    other) pass: promtool test rules exits 0."""
    run_promtool("test", "rules", RULE_TESTS.name)


def test_every_alert_has_severity_runbook_and_expression() -> None:
    """Each of the required alerts is defined once, with an expression the extractor reads
    metric names from and a runbook anchor that docs/operations.md has as a heading."""
    text = RULES.read_text(encoding="utf-8")
    expressions = dict(rule_expressions(text))
    expected = {
        "GatewayDatabaseDown",
        "GatewayListenDown",
        "GatewayChargesSpooling",
        "GatewayHigh5xxRatio",
        "GatewayUpstreamErrors",
        "GatewayAddedLatencyP99High",
        "GatewayShadowWouldBlock",
    }
    assert set(expressions) == expected
    assert all(metric_names(expr) for expr in expressions.values()), expressions
    anchors = set(re.findall(r'runbook_url:\s*"docs/operations\.md#([\w-]+)"', text))
    assert anchors == {name.lower() for name in expected}
    headings = re.findall(
        r"^## (\S+)\s*$", (ROOT / "docs" / "operations.md").read_text("utf-8"), re.M
    )
    assert anchors <= {heading.lower() for heading in headings}
    assert text.count("severity:") == len(expected)


def test_dashboard_parses_and_every_panel_has_a_target() -> None:
    """gateway.json is JSON with a datasource variable, and every data panel queries
    something."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = list(dashboard_panels(dashboard))
    assert panels
    empty = [
        p.get("title") for p in panels if not [t for t in p.get("targets", []) if t.get("expr")]
    ]
    assert not empty, f"panels without a target: {empty}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def has_sample(exposition: str, name: str, labels: dict[str, str]) -> bool:
    """True when the exposition has a sample `name` whose labels include `labels`."""
    return any(
        sample.name == name and labels.items() <= sample.labels.items()
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    )


async def scrape_until(
    client: aiohttp.ClientSession, gateway: RunningGateway, name: str, labels: dict[str, str]
) -> str:
    """Poll /metrics until it has the sample; return the text. (The gateway counts a
    request as its handler finishes, which can be just after the client has the answer.)"""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        async with client.get(str(gateway.url) + "/metrics") as response:
            assert response.status == 200
            exposition = await response.text()
        if has_sample(exposition, name, labels):
            return exposition
        assert time.monotonic() < deadline, f"no {name}{labels} sample in /metrics"
        await asyncio.sleep(0.02)


async def test_rules_and_dashboard_name_only_exported_metrics(
    gateway: RunningGateway, client: aiohttp.ClientSession
) -> None:
    """Every metric name in a rule expression or a panel target is one the running
    gateway's /metrics declares (with the sample suffixes of its type), and /readyz,
    which the database alerts count, is counted under route="/readyz"."""
    async with client.get(str(gateway.url) + "/readyz") as response:
        assert response.status == 200
    readyz = {"route": "/readyz", "method": "GET", "status": "200"}
    exposition = await scrape_until(client, gateway, "gateway_requests_total", readyz)
    exported = exported_names(exposition)
    used = used_names()
    unknown = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not unknown, f"metrics the gateway does not export: {unknown}"
