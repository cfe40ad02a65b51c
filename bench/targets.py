"""The targets the bench drives, each started here as its own process on loopback.

- ``direct``: the fake OpenRouter itself (the floor of floors);
- ``aiohttp-floor``: ``bench/floor_proxy.py``, a bare aiohttp pass-through;
- ``gateway``: ``python -m gateway serve`` in enforce mode, one organization's key (warm);
- ``gateway-baseline``: the same, run from ``--baseline-tree`` (a checkout of an earlier
  commit), whose ``gateway`` package is imported instead of the installed one;
- ``gateway-cold``: another gateway process, every request from another organization;
- ``nginx``: a plain reverse proxy, when the ``nginx`` binary is installed;
- ``litellm``: the LiteLLM proxy from ``--litellm-venv``, routing to the fake upstream.

A target that cannot run here is a :class:`Skipped` with the reason, never faked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.procs import Child, free_port, ready_or_stop, spawn
from gateway.config import load_defaults

DIRECT: Final = "direct"
FLOOR: Final = "aiohttp-floor"
GATEWAY: Final = "gateway"
# The gateway of an earlier commit (``--baseline-tree``), beside this one in the same run.
GATEWAY_BASELINE: Final = "gateway-baseline"
GATEWAY_COLD: Final = "gateway-cold"
# The gateway with metering switched off (METERED_PATHS=none): what metering costs.
GATEWAY_UNMETERED: Final = "gateway-unmetered"
NGINX: Final = "nginx"
LITELLM: Final = "litellm"
ALL_TARGETS: Final = (
    DIRECT,
    FLOOR,
    GATEWAY,
    GATEWAY_BASELINE,
    GATEWAY_UNMETERED,
    GATEWAY_COLD,
    NGINX,
    LITELLM,
)
# The targets that are a gateway process on the bench's database.
GATEWAY_TARGETS: Final = (GATEWAY, GATEWAY_BASELINE, GATEWAY_UNMETERED, GATEWAY_COLD)

HOST: Final = "127.0.0.1"
MODEL: Final = "openai/gpt-4o-mini"
UPSTREAM_KEY: Final = "sk-or-v1-bench-upstream-key-not-a-secret"
READY_SECONDS: Final = 60.0
LITELLM_READY_SECONDS: Final = 180.0
PROJECT_ROOT: Final = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    """A running target: where to send chat completions and how to measure its processes."""

    name: str
    chat_url: str
    child: Child
    token: str | None = None
    keys_file: Path | None = None  # gateway-cold: one token per line, rotated per request
    metrics_url: str | None = None  # the gateway's Prometheus endpoint
    info: dict[str, Any] = field(default_factory=dict)  # extra facts for the results


@dataclass(frozen=True, slots=True)
class Skipped:
    """A target that does not run on this machine, and why."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Upstream:
    """A running fake OpenRouter."""

    child: Child
    root_url: str

    @property
    def api_url(self) -> str:
        """OpenRouter-style base URL (``…/api/v1``)."""
        return self.root_url + "/api/v1"


def start_upstream(name: str, log_dir: Path, *, chunks: int, interval_seconds: float) -> Upstream:
    """Start ``python -m bench.fake_upstream`` streaming ``chunks`` at the interval."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.fake_upstream", "--host", HOST, "--port", str(port)]
    argv += ["--chunks", str(chunks), "--interval", repr(interval_seconds)]
    child = spawn(name, argv, log_dir=log_dir, cwd=PROJECT_ROOT)
    root = f"http://{HOST}:{port}"
    ready_or_stop(child, root + "/api/v1/models", READY_SECONDS)
    return Upstream(child, root)


def direct_target(upstream: Upstream, token: str) -> Target:
    """The fake upstream as a target of its own."""
    return Target(DIRECT, upstream.api_url + "/chat/completions", upstream.child, token)


def start_floor(upstream: Upstream, log_dir: Path, token: str, name: str = FLOOR) -> Target:
    """Start the bare aiohttp pass-through in front of the upstream."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.floor_proxy", "--host", HOST, "--port", str(port)]
    child = spawn(name, [*argv, "--upstream", upstream.root_url], log_dir=log_dir)
    base = f"http://{HOST}:{port}/api/v1"
    ready_or_stop(child, base + "/models", READY_SECONDS)
    return Target(name, base + "/chat/completions", child, token)


def gateway_env(upstream: Upstream, database_url: str, port: int, work_dir: Path) -> dict[str, str]:
    """The gateway's environment: ours over defaults, nothing inherited from the shell's."""
    env = {k: v for k, v in os.environ.items() if k not in load_defaults().get("env", {})}
    env.pop("GATEWAY_CONFIG_FILE", None)
    env.update(
        DATABASE_URL=database_url,
        OPENROUTER_BASE_URL=upstream.api_url,
        OPENROUTER_API_KEY=UPSTREAM_KEY,
        GATEWAY_HOST=HOST,
        GATEWAY_PORT=str(port),
        ENFORCEMENT_MODE="enforce",
        LOG_LEVEL="info",  # the per-request log line is part of the cost
        SHUTDOWN_TIMEOUT_SECONDS="5",
        USAGE_SPOOL_DIR=str(work_dir / "usage-spool"),
        EMBEDDED_DATA_DIR=str(work_dir / "unused-embedded-postgres"),
    )
    return env


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """How to start one gateway target."""

    name: str
    workers: int
    token: str | None = None
    keys_file: Path | None = None
    keep_stdout: bool = False
    env: dict[str, str] = field(default_factory=dict)  # over gateway_env's
    tree: Path | None = None  # run this checkout's ``gateway`` package (gateway-baseline)


def start_gateway(
    options: GatewayOptions, upstream: Upstream, database_url: str, tmp: Path, log_dir: Path
) -> Target:
    """Start ``python -m gateway serve`` with its stdout (the request log) to /dev/null."""
    port = free_port()
    work_dir = tmp / options.name
    work_dir.mkdir(exist_ok=True)
    env = gateway_env(upstream, database_url, port, work_dir) | options.env
    cwd = PROJECT_ROOT
    if options.tree is not None:
        cwd = options.tree
        env.update(tree_env(options.tree))
    argv = [sys.executable, "-m", "gateway", "serve", "--workers", str(options.workers)]
    child = spawn(
        options.name,
        argv,
        log_dir=log_dir,
        env=env,
        keep_stdout=options.keep_stdout,
        cwd=cwd,
    )
    root = f"http://{HOST}:{port}"
    ready_or_stop(child, root + "/healthz", READY_SECONDS)
    target = Target(
        options.name,
        root + "/api/openrouter/chat/completions",
        child,
        token=options.token,
        keys_file=options.keys_file,
        metrics_url=root + "/metrics",
    )
    if options.tree is not None:
        # What the running process really got, read back from /proc.
        target.info = {
            **tree_facts(options.tree),
            "cwd": _proc_cwd(child.pid),
            "pythonpath": _proc_environ(child.pid).get("PYTHONPATH"),
        }
    return target


def tree_env(tree: Path) -> dict[str, str]:
    """What makes ``python -m gateway`` import ``tree``'s package: PYTHONPATH (and cwd)."""
    return {"PYTHONPATH": str(tree)}


# Run in a child with the baseline's cwd and PYTHONPATH: import every module of the
# tree's ``gateway`` package and list any ``gateway.*`` module loaded from elsewhere.
# ``gateway`` has no ``__init__.py``, so it is a namespace package and the installed
# (editable) tree is a portion of it too: the tree's modules come first on its path, but
# a module only the installed tree has would still be found there.
_IMPORT_CHECK: Final = """
import importlib, json, pathlib, sys
tree = pathlib.Path(sys.argv[1]).resolve()
failed = {}
for source in sorted((tree / "gateway").glob("*.py")):
    try:
        importlib.import_module("gateway." + source.stem)
    except Exception as exc:
        failed[source.stem] = repr(exc)[:200]
loaded = {n: getattr(m, "__file__", None) for n, m in sys.modules.items()
          if n == "gateway" or n.startswith("gateway.")}
outside = {n: f for n, f in loaded.items()
           if f is not None and not pathlib.Path(f).resolve().is_relative_to(tree)}
print(json.dumps({"modules": len(loaded), "outside": outside, "failed": failed}))
"""
_TREE_FACTS: dict[Path, dict[str, Any]] = {}


def tree_facts(tree: Path) -> dict[str, Any]:
    """The tree, its commit and where its modules import from (checked once per run)."""
    if tree not in _TREE_FACTS:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | tree_env(tree)
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT_CHECK, str(tree)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tree,
            check=False,
            timeout=120,
        )
        try:
            check = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            check = {"error": (done.stdout + done.stderr)[-2000:]}
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        _TREE_FACTS[tree] = {"tree": str(tree), "commit": commit or None, "import_check": check}
    return _TREE_FACTS[tree]


def tree_problem(tree: Path) -> str | None:
    """Why ``tree``'s gateway would not be the one measured, or None when it would."""
    check = tree_facts(tree)["import_check"]
    if "error" in check:
        return f"the import check in {tree} failed: {check['error']}"
    if check["outside"]:
        outside = ", ".join(f"{n} from {f}" for n, f in sorted(check["outside"].items()))
        return f"modules imported from outside {tree}: {outside}"
    return None


def _proc_cwd(pid: int) -> str | None:
    """The working directory of a running process."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _proc_environ(pid: int) -> dict[str, str]:
    """The environment a running process was started with."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def start_gateway_baseline(
    options: GatewayOptions, upstream: Upstream, database_url: str, tmp: Path, log_dir: Path
) -> Target | Skipped:
    """The gateway of ``options.tree``, or Skipped when there is none or it is not isolated."""
    if options.tree is None:
        return Skipped(GATEWAY_BASELINE, "no --baseline-tree given")
    problem = tree_problem(options.tree)
    if problem is not None:
        return Skipped(GATEWAY_BASELINE, problem)
    return start_gateway(options, upstream, database_url, tmp, log_dir)


NGINX_CONF: Final = """\
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream fake_openrouter {{
        server {upstream};
        keepalive 1024;
        keepalive_requests 10000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://fake_openrouter;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def start_nginx(
    upstream: Upstream, workers: int, tmp: Path, log_dir: Path, token: str
) -> Target | Skipped:
    """Start nginx as a plain reverse proxy, or Skipped when the binary is absent."""
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if binary is None:
        return Skipped(NGINX, "no nginx binary (Debian: apt-get install nginx-light)")
    prefix = tmp / "nginx"
    prefix.mkdir(exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    upstream_address = upstream.root_url.removeprefix("http://")
    fields = {"workers": workers, "tmp": prefix, "host": HOST, "port": port}
    conf.write_text(NGINX_CONF.format(upstream=upstream_address, **fields))
    if os.geteuid() == 0:
        # Workers run as nobody; they must be able to create their temp files here.
        prefix.chmod(0o777)
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    child = spawn(NGINX, [*argv, "-g", "daemon off;"], log_dir=log_dir)
    base = f"http://{HOST}:{port}/api/v1"
    ready_or_stop(child, base + "/models", READY_SECONDS)
    return Target(NGINX, base + "/chat/completions", child, token)


def start_litellm(
    venv: Path | None, upstream: Upstream, workers: int, tmp: Path, log_dir: Path, token: str
) -> Target | Skipped:
    """Start the LiteLLM proxy from ``venv``, or Skipped when none was given or found."""
    if venv is None:
        return Skipped(LITELLM, "no --litellm-venv given")
    binary = venv / "bin" / "litellm"
    if not os.access(binary, os.X_OK):
        return Skipped(LITELLM, f"{binary} not found")
    config = tmp / "litellm.yaml"  # JSON is YAML
    model = {"model": "openai/" + MODEL, "api_base": upstream.api_url, "api_key": "sk-dummy"}
    config.write_text(json.dumps({"model_list": [{"model_name": MODEL, "litellm_params": model}]}))
    # No database, no outbound calls: the cost map ships with the package.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VIRTUAL_ENV")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
    port = free_port()
    argv = [str(binary), "--config", str(config), "--host", HOST, "--port", str(port)]
    argv += ["--num_workers", str(workers), "--telemetry", "False"]
    child = spawn(LITELLM, argv, log_dir=log_dir, env=env, cwd=tmp)
    root = f"http://{HOST}:{port}"
    ready_or_stop(child, root + "/health/liveliness", LITELLM_READY_SECONDS)
    return Target(LITELLM, root + "/v1/chat/completions", child, token)
