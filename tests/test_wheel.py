"""The wheel alone carries the gateway: `sql/` and `config/` ship inside the package.

The wheel is built from a copy of what pyproject.toml packages, installed into a fresh
virtual environment outside the checkout, and `python -m gateway migrate` and `serve`
run there, from a directory with no checkout on the path. The dependencies come from
this environment (a path file), so the test needs no index beyond the build's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bench.fake_upstream import RunningUpstream
from bench.procs import free_port
from gateway.config import PROJECT_ROOT, SETTINGS, load_defaults
from gateway.platform.migrations import discover

BUILD_TIMEOUT_SECONDS = 45.0
COMMAND_TIMEOUT_SECONDS = 30.0
READY_DEADLINE_SECONDS = 20.0
# Where the probe finds everything, printed as JSON by the installed interpreter.
PROBE = """
import json, sys
import gateway, gateway.config, gateway.platform.migrations, gateway.plans
print(json.dumps({
    "gateway": list(gateway.__path__),
    "defaults": str(gateway.config.DEFAULTS_FILE),
    "plans": str(gateway.plans.PLANS_FILE),
    "sql": str(gateway.platform.migrations.SQL_DIR),
    "path": sys.path,
}))
"""


def source_dirs() -> set[str]:
    """The repository's directories pyproject.toml packages (mapped ones included)."""
    setuptools = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    return {mapped.get(package, package.split(".")[0]) for package in setuptools["packages"]}


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources: the checkout's build/ stays untouched."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PROJECT_ROOT / name, source / name)
    for name in source_dirs():
        shutil.copytree(
            PROJECT_ROOT / name,
            source / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "results"),
        )
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), "."],
        cwd=source, timeout=BUILD_TIMEOUT_SECONDS)  # fmt: skip
    (wheel,) = dist.glob("kilo_gateway-*.whl")
    return wheel


def run(args: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    finished = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert finished.returncode == 0, f"{args}: {finished.stdout}\n{finished.stderr}"
    return finished.stdout


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new virtual environment with the wheel installed; its Python."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, timeout=30)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    run([*pip, "--no-deps", "--no-index", str(wheel)], cwd=tmp_path, timeout=60)
    # Only now the dependencies: installing saw an environment without any gateway.
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=tmp_path,
        timeout=30,
    ).strip()
    (Path(purelib) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def child_env(**settings: str) -> dict[str, str]:
    """This environment without Python's or the gateway's settings, plus `settings`."""
    dropped = {s.name for s in SETTINGS} | {
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "VIRTUAL_ENV",
        "PROMETHEUS_MULTIPROC_DIR",
    }
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(settings)
    return env


def is_inside(path: str | Path, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(directory.resolve())


@pytest.fixture
async def installed(tmp_path: Path) -> AsyncIterator[tuple[Path, Path, float]]:
    """The fresh environment's Python, the wheel, and how long both took to make."""
    started = time.monotonic()
    wheel = await asyncio.to_thread(build_wheel, tmp_path)
    python = await asyncio.to_thread(fresh_venv, tmp_path, wheel)
    yield python, wheel, time.monotonic() - started


def test_dockerfile_installs_the_wheel() -> None:
    """The image is built from the wheel, not from an editable tree."""
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert "pip wheel" in dockerfile and "/wheels/*.whl" in dockerfile
    assert " -e " not in dockerfile and "--editable" not in dockerfile


async def test_the_wheel_migrates_and_serves_outside_the_checkout(
    installed: tuple[Path, Path, float],
    empty_database_url: str,
    upstream: RunningUpstream,
    tmp_path: Path,
) -> None:
    """sql/ and config/ are inside the wheel, found there, and enough to run the gateway."""
    python, wheel, setup_seconds = installed
    venv = python.parent.parent
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = {m.path.name for m in discover()}
    assert {f"gateway/sql/{name}" for name in migrations} <= names
    assert {"gateway/config_files/defaults.toml", "gateway/config_files/plans.toml"} <= names
    assert not any(name.startswith(("sql/", "config/")) for name in names)
    modules = {p.relative_to(PROJECT_ROOT).as_posix() for p in PROJECT_ROOT.glob("gateway/**/*.py")}
    assert modules <= names
    pages = {
        p.relative_to(PROJECT_ROOT).as_posix()
        for pattern in ("gateway/pages/templates/*.html", "gateway/pages/static/*.css")
        for p in PROJECT_ROOT.glob(pattern)
    }
    assert pages and pages <= names

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = child_env(
        DATABASE_URL=empty_database_url,
        OPENROUTER_BASE_URL=upstream.url,
        OPENROUTER_API_KEY="sk-or-v1-wheel-test-key",
        GATEWAY_HOST="127.0.0.1",
        USAGE_SPOOL_DIR=str(workdir / "spool"),
        LOG_LEVEL="warning",
    )
    probe = json.loads(run([str(python), "-c", PROBE], cwd=workdir, env=env, timeout=30))
    assert probe["gateway"] and all(is_inside(p, venv) for p in probe["gateway"]), probe
    for key in ("defaults", "plans", "sql"):
        assert is_inside(probe[key], venv), probe
    # Nothing of the checkout is on the path but this environment's dependencies.
    inside = {p for p in probe["path"] if p and is_inside(p, PROJECT_ROOT)}
    assert inside <= {sysconfig.get_paths()["purelib"]}, probe

    migrated = run([str(python), "-m", "gateway", "migrate"], cwd=workdir, env=env, timeout=30)
    assert f"applied migrations: {sorted(m.version for m in discover())}" in migrated

    port = free_port()
    log = workdir / "serve.log"
    with log.open("wb") as output:
        serving = await asyncio.create_subprocess_exec(
            str(python), "-m", "gateway", "serve",
            cwd=workdir, env={**env, "GATEWAY_PORT": str(port)},
            stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        defaults = await ready_and_defaults(f"http://127.0.0.1:{port}", serving, log)
        # What the packaged defaults.toml says, served by the installed gateway.
        assert defaults["defaultModel"] == load_defaults()["env"]["DEFAULT_MODEL"]
        serving.send_signal(signal.SIGTERM)
        await asyncio.wait_for(serving.wait(), COMMAND_TIMEOUT_SECONDS)
        assert serving.returncode == 0, read(log)
    finally:
        if serving.returncode is None:
            serving.kill()
            await serving.wait()
    print(f"wheel built and installed in {setup_seconds:.1f} s")


async def ready_and_defaults(
    base: str, process: asyncio.subprocess.Process, log: Path
) -> dict[str, str]:
    """Poll until /healthz and /readyz answer 200 (failing if the process exits first);
    then the sign-in page and its stylesheet, and GET /api/defaults."""
    deadline = time.monotonic() + READY_DEADLINE_SECONDS
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while not await answers(session, f"{base}/healthz", f"{base}/readyz"):
            if process.returncode is not None:
                pytest.fail(f"serve exited with {process.returncode}: {read(log)}")
            assert time.monotonic() < deadline, f"serve did not answer in time: {read(log)}"
            await asyncio.sleep(0.1)
        # The pages' templates and stylesheet come from the wheel too.
        for page in ("/login", "/static/pages.css"):
            async with session.get(f"{base}{page}") as answer:
                assert answer.status == 200, (page, await answer.text())
        async with session.get(f"{base}/api/defaults") as answer:
            assert answer.status == 200
            result: dict[str, str] = await answer.json()
            return result


async def answers(session: aiohttp.ClientSession, *urls: str) -> bool:
    """Whether every URL answers 200."""
    for url in urls:
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    return False
        except aiohttp.ClientError:
            return False
    return True


def read(log: Path) -> str:
    return log.read_text(errors="replace")
