"""The real Kilo CLI (`@kilocode/cli-linux-x64`, the binary users run) through the gateway.

The binary is installed with npm into `.kilo-cli/` (ignored by git, kept between runs;
`.ci/run` installs it first). These tests skip, saying why, only when it is not there
and npm cannot fetch it. Each run gets a fresh HOME; the CLI's calls to the outside
(models.dev, telemetry, updates) fail on a closed network and must not matter.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.config import PROJECT_ROOT
from tests.conftest import RunningGateway
from tests.factories import Seed

CLI_PACKAGE = "@kilocode/cli-linux-x64@7.7.9"
CLI_DIR = PROJECT_ROOT / ".kilo-cli"
CLI_BINARY = CLI_DIR / "node_modules" / "@kilocode" / "cli-linux-x64" / "bin" / "kilo"
INSTALL_TIMEOUT_SECONDS = 300
RUN_TIMEOUT_SECONDS = 120
# What the fake upstream streams for every chat completion.
STREAMED_ANSWER = "tok0 tok1 tok2"
EXPIRED = timedelta(days=40)
QUIET = {
    "KILO_TELEMETRY_LEVEL": "off",
    "KILO_DISABLE_AUTOUPDATE": "1",
    "KILO_DISABLE_MODELS_FETCH": "1",
    "KILO_DISABLE_LSP_DOWNLOAD": "1",
    "KILO_DISABLE_SHARE": "1",
    "NO_COLOR": "1",
}


def install_cli() -> Path:
    """The CLI binary, installed with npm if it is not there yet."""
    if CLI_BINARY.exists():
        return CLI_BINARY
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"{CLI_PACKAGE} runs on linux x86_64 only, not {platform.machine()}")
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed, so {CLI_PACKAGE} cannot be fetched")
    try:
        done = subprocess.run(
            [
                npm,
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(CLI_DIR),
                CLI_PACKAGE,
            ],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm could not fetch {CLI_PACKAGE} within {INSTALL_TIMEOUT_SECONDS}s")
    if done.returncode != 0 or not CLI_BINARY.exists():
        pytest.skip(f"npm could not fetch {CLI_PACKAGE}: {done.stderr.strip()[-300:]}")
    return CLI_BINARY


@pytest.fixture(scope="session")
def kilo() -> Path:
    return install_cli()


def project_dir(home: Path) -> Path:
    """An empty project folder inside `home`, where the CLI runs."""
    project = home / "project"
    project.mkdir(parents=True, exist_ok=True)
    return project


async def run_kilo(
    kilo: Path, home: Path, gateway: RunningGateway, *args: str, **env: str
) -> tuple[int, str]:
    """Run the CLI against the gateway; its exit code and everything it printed."""
    project = project_dir(home)
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "KILO_API_URL": str(gateway.url),
        **QUIET,
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        str(kilo),
        *args,
        cwd=project,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def signed_in(home: Path, token: str, organization_id: str | None = None) -> Path:
    """A HOME where `kilo auth login` has stored the key (what `kilo profile` reads)."""
    auth: dict[str, object] = {
        "type": "oauth",
        "access": token,
        "refresh": "",
        "expires": 4_102_444_800_000,
    }
    if organization_id is not None:
        auth["accountId"] = organization_id
    data = home / ".local" / "share" / "kilo"
    data.mkdir(parents=True, exist_ok=True)
    (data / "auth.json").write_text(json.dumps({"kilo": auth}))
    return home


def billing_url(organization_id: str) -> str:
    # make_config's APP_URL.
    return f"https://app.example.test/organizations/{organization_id}/billing"


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS * 2)
async def test_a_prompt_completes_in_plain_mode(
    kilo: Path, gateway: RunningGateway, seed: Seed, tmp_path: Path
) -> None:
    """`kilo run` with KILO_API_KEY: the model list, then the streamed answer printed."""
    org = await seed.org()
    _user, token = await seed.member_with_key(org)

    code, output = await run_kilo(kilo, tmp_path, gateway, "run", "say hi", KILO_API_KEY=token)

    assert code == 0, output
    assert STREAMED_ANSWER in output


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS * 2)
async def test_a_prompt_completes_in_organization_mode(
    kilo: Path, gateway: RunningGateway, seed: Seed, tmp_path: Path
) -> None:
    """A member of two organizations with an unbound key picks one with KILO_ORG_ID: the
    CLI lists models for that organization and its prompt is answered."""
    org, other = await seed.org(), await seed.org()
    user, token = await seed.member_with_key(org)
    await seed.member(other, user)

    code, output = await run_kilo(
        kilo, tmp_path, gateway, "run", "say hi", KILO_API_KEY=token, KILO_ORG_ID=org
    )

    assert code == 0, output
    assert STREAMED_ANSWER in output


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS * 3)
async def test_every_kind_of_402_prints_the_billing_link(
    kilo: Path, gateway: RunningGateway, seed: Seed, tmp_path: Path
) -> None:
    """The CLI prints only the 402's message: for each reason it still shows where to pay,
    in plain mode and in organization mode."""
    trial_over = await seed.org(age=EXPIRED)
    lapsed = await seed.org(age=EXPIRED)
    await seed.purchase(lapsed, status="ended")
    crowded = await seed.org(age=EXPIRED)
    await seed.purchase(crowded, seat_count=1)
    await seed.member(crowded, await seed.user())
    broke = await seed.org(credits_acquired_microdollars=0)
    # A renewal declined three weeks ago: past PAST_DUE_GRACE_DAYS (14).
    declined = await seed.org(age=EXPIRED)
    await seed.purchase(
        declined, status="past_due", starts_at=datetime.now(UTC) - timedelta(days=21)
    )
    cases = []
    for name, org in [
        ("trial", trial_over),
        ("lapsed", lapsed),
        ("seats", crowded),
        ("credits", broke),
        ("payment", declined),
    ]:
        _user, token = await seed.member_with_key(org)
        # Half in organization mode, half plain: the link is the same either way.
        env = {"KILO_API_KEY": token}
        if name in ("lapsed", "credits"):
            env["KILO_ORG_ID"] = org
        cases.append((org, run_kilo(kilo, tmp_path / name, gateway, "run", "say hi", **env)))

    # Two at a time: each CLI start takes a core for seconds.
    results = []
    for i in range(0, len(cases), 2):
        results += await asyncio.gather(*(run for _, run in cases[i : i + 2]))

    for (org, _), (code, output) in zip(cases, results, strict=True):
        assert code != 0, output
        assert billing_url(org) in output, output
        assert STREAMED_ANSWER not in output


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS)
async def test_kilo_profile_prints_the_user_and_organization(
    kilo: Path, gateway: RunningGateway, seed: Seed, tmp_path: Path, db
) -> None:
    """`kilo profile`, signed in: the user's email, the chosen organization and its balance."""
    org = await seed.org(name="Acme Rockets", credits_acquired_microdollars=7_250_000)
    user, token = await seed.member_with_key(org)
    email = await db.fetchval("SELECT email FROM users WHERE id = $1", user)
    home = signed_in(tmp_path, token, org)

    code, output = await run_kilo(kilo, home, gateway, "profile")

    assert code == 0, output
    assert email in output
    assert "Acme Rockets" in output
    assert "$7.25" in output
