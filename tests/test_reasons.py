"""Every reason a refusal can carry is one `Reason`, and the README's tables list each.

Clients (the extension, scripts, the rest of the backend) branch on `error_type`; the
README is where they learn the names, so the two must not drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

from gateway.errors import GatewayError, Reason

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_reasons() -> set[str]:
    """The backticked names in the reason column of every `| status | reason | … |` table."""
    names: set[str] = set()
    in_table = False
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[:2] == ["status", "reason"]:
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not set(cells[0]) <= set("-: "):
            names.update(re.findall(r"`([a-z_]+)`", cells[1]))
    return names


def test_the_readme_lists_every_reason_and_no_other() -> None:
    documented, declared = readme_reasons(), {reason.value for reason in Reason}
    assert declared - documented == set(), "reasons the README does not list"
    assert documented - declared == set(), "reasons the README lists that do not exist"


def every_error_class() -> list[type[GatewayError]]:
    found, pending = [], [GatewayError]
    while pending:
        kind = pending.pop()
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return found


def test_every_default_reason_is_a_reason() -> None:
    for kind in every_error_class():
        assert kind.default_reason is None or isinstance(kind.default_reason, Reason), kind


def test_a_class_without_a_default_reason_demands_one() -> None:
    kinds = [kind for kind in every_error_class() if kind.default_reason is None]
    assert kinds, "PaymentRequired, Conflict and Gone name their reason at every refusal"
    for kind in kinds:
        try:
            kind("refused")
        except TypeError as exc:
            assert "needs a reason" in str(exc)
        else:
            raise AssertionError(f"{kind.__name__} accepted a refusal without a reason")
