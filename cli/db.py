"""``asyncthink db upgrade``: run the Alembic migrations (compose and k8s run this before the services)."""

from __future__ import annotations

import argparse

from cli import CliError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("db", help="database migrations")
    p.add_argument("action", choices=("upgrade", "check"), help="upgrade: migrate to the newest schema; "
                   "check: only test the connection")
    p.add_argument("--db", help="database URL (default: DATABASE_URL or sqlite:///asyncthink.db)")
    p.set_defaults(func=cmd_db)


def cmd_db(args: argparse.Namespace) -> int:
    from shared.config import get_settings
    from shared.store import db

    url = args.db or get_settings().database_url
    try:
        db.check_connection(url)
        if args.action == "upgrade":
            db.migrate(url)
    except db.StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    print(f"database ok ({args.action})")
    return 0
