"""Command line: `python -m gateway serve|migrate|create-key|stripe-setup`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway import config as gateway_config
from gateway.accounts import admin
from gateway.accounts.stripe_setup import run_stripe_setup
from gateway.errors import GatewayError
from gateway.platform.database import connect
from gateway.platform.logs import flush, setup_logging
from gateway.server import apply_migrations, serve, with_database


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the gateway")
    serve_cmd.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    migrate_cmd = commands.add_parser("migrate", help="apply pending schema migrations")
    migrate_cmd.add_argument("--target", type=int, default=None, help="stop after migration N")
    key_cmd = commands.add_parser(
        "create-key", help="create a user, an organization they own, and an API key (for trying)"
    )
    key_cmd.add_argument("--email", required=True)
    key_cmd.add_argument("--organization-name", default="My organization")
    key_cmd.add_argument(
        "--credits-usd", type=float, default=0.0, help="credits to grant the new organization"
    )
    commands.add_parser(
        "stripe-setup",
        help="create the plans' Stripe products and prices (idempotent; needs STRIPE_SECRET_KEY)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = gateway_config.from_env(need_upstream_key=args.command == "serve")
    except gateway_config.ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    if args.command == "serve":
        if args.workers < 1:
            print("gateway: --workers must be at least 1", file=sys.stderr)
            return 2
        return serve(config, args.workers)
    if args.command == "stripe-setup":
        return _stripe_setup(config)
    config, _embedded = with_database(config)
    if args.command == "migrate":
        applied = asyncio.run(apply_migrations(config, target=args.target))
        print(f"applied migrations: {applied or 'none pending'}")
        return 0
    asyncio.run(apply_migrations(config))
    new = asyncio.run(_create_key(config, args.email, args.organization_name, args.credits_usd))
    print(f"organization {new.organization_id}, user {new.user_id}")
    print(f"API key (shown once): {new.token}")
    return 0


def _stripe_setup(config: gateway_config.Config) -> int:
    if not config.stripe_configured:
        print(
            "gateway: stripe-setup needs STRIPE_SECRET_KEY (a Stripe secret key, "
            "sk_test_... or sk_live_...)",
            file=sys.stderr,
        )
        return 2
    try:
        report = asyncio.run(run_stripe_setup(config))
    except GatewayError as exc:
        print(f"gateway: stripe-setup failed: {exc.message} ({exc.__cause__})", file=sys.stderr)
        return 1
    for line in report.lines:
        print(line)
    print(
        f"stripe-setup: {report.created} created, {report.updated} updated, "
        f"{report.mismatched} differing from config"
    )
    return 1 if report.mismatched else 0


async def _create_key(
    config: gateway_config.Config, email: str, name: str, credits_usd: float
) -> admin.NewKey:
    assert config.database_url is not None
    async with connect(config.database_url) as conn:
        return await admin.create_key(conn, email, name, credits_usd)


if __name__ == "__main__":
    try:
        status = main()
    finally:
        flush()
    sys.exit(status)
