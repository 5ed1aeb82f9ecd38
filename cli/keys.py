"""``asyncthink keys create | list | revoke``: the gateway's API keys, in its database.

``create`` prints the new key alone on standard output (so a script can capture it) and what it is on
standard error; the key is shown this once: the database keeps only its SHA-256. ``list`` never shows
keys, only their ids (the ``<id>`` of ``atk_<id>_...``), names, scopes and limits. ``revoke`` stops a key
at once (a running gateway trusts a verified key for at most ``ASYNCTHINK_AUTH_CACHE_S`` more seconds).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from cli import CliError
from shared.auth import SCOPES

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

DB_HELP = "database URL (default: DATABASE_URL or sqlite:///asyncthink.db)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keys", help="create, list and revoke the gateway's API keys")
    verbs = p.add_subparsers(dest="keys_verb", metavar="ACTION", required=True)

    c = verbs.add_parser("create", help="create a key and print it (once)")
    c.add_argument("--name", required=True, help="who or what the key is for")
    c.add_argument("--scope", action="append", required=True, choices=SCOPES, dest="scopes",
                   help="submit (problems, chat), read (episodes, events, models), admin (all, every key's "
                   "episodes, /metrics) or human (the pages for people: the human queue, the organizer and planning "
                   "pages, /ui); repeat for several")
    c.add_argument("--pool", action="append", dest="pools", metavar="POOL",
                   help="with --scope human: a pool of the human queue this key works in (default, or a name of "
                   "ASYNCTHINK_HUMAN_POOLS); repeat for several (default: every pool)")
    c.add_argument("--rate-limit", type=int, metavar="PER_MINUTE",
                   help="requests a minute (0: no limit; default: ASYNCTHINK_RATE_LIMIT_PER_MINUTE, 600)")
    c.add_argument("--db", help=DB_HELP)
    c.set_defaults(func=cmd_create)

    ls = verbs.add_parser("list", help="list keys (never the keys themselves)")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    ls.add_argument("--db", help=DB_HELP)
    ls.set_defaults(func=cmd_list)

    r = verbs.add_parser("revoke", help="revoke a key by its id")
    r.add_argument("key_id", metavar="ID", help="the key's id, as `asyncthink keys list` shows it")
    r.add_argument("--db", help=DB_HELP)
    r.set_defaults(func=cmd_revoke)


def _sessions(args: argparse.Namespace) -> sessionmaker[Session]:
    from sqlalchemy import inspect

    from shared.config import get_settings
    from shared.store import db

    url = args.db or get_settings().database_url
    try:
        db.check_connection(url)
    except db.StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    engine = db.make_engine(url)
    if "api_keys" not in inspect(engine).get_table_names():
        engine.dispose()
        raise CliError(
            f"the database at {db.mask_url(url)} has no api_keys table: run `asyncthink db upgrade"
            f"{' --db ' + db.mask_url(url) if args.db else ''}` first"
        )
    return db.session_factory(engine)


def cmd_create(args: argparse.Namespace) -> int:
    from shared.store import repository

    if args.rate_limit is not None and args.rate_limit < 0:
        raise CliError(f"--rate-limit must be 0 (no limit) or more, got {args.rate_limit}")
    if args.pools and "human" not in args.scopes:
        raise CliError("--pool is for keys of --scope human (the human queue's pools)")
    sessions = _sessions(args)
    with sessions() as session:
        row, key = repository.create_api_key(
            session, name=args.name, scopes=args.scopes, rate_limit_per_minute=args.rate_limit, pools=args.pools
        )
    limit = "the default rate limit" if row.rate_limit_per_minute is None else _limit(row.rate_limit_per_minute)
    pools = f"; pools: {', '.join(row.pools)}" if row.pools else ""
    print(
        f"created key {row.id} {row.name!r} (scopes: {', '.join(row.scopes)}{pools}; {limit}). "
        "It is shown only once; the database keeps only its hash:",
        file=sys.stderr,
    )
    print(key)
    return 0


def _limit(per_minute: int | None) -> str:
    if per_minute is None:
        return "default"
    return "no limit" if per_minute == 0 else f"{per_minute}/min"


def cmd_list(args: argparse.Namespace) -> int:
    from shared.store import repository

    sessions = _sessions(args)
    with sessions() as session:
        rows = repository.list_api_keys(session, include_revoked=args.all)
    if not rows:
        print("no keys" + ("" if args.all else " (revoked ones: --all)"))
        return 0
    header = f"{'id':<12}  {'name':<24}  {'scopes':<28}  {'rate limit':<10}  {'created':<16}  revoked"
    print(header)
    for row in rows:
        revoked = row.revoked_at.strftime("%Y-%m-%d %H:%M") if row.revoked_at else "-"
        print(
            f"{row.id:<12}  {row.name[:24]:<24}  {', '.join(row.scopes):<28}  "
            f"{_limit(row.rate_limit_per_minute):<10}  {row.created_at:%Y-%m-%d %H:%M}  {revoked}"
        )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from shared.store import repository

    sessions = _sessions(args)
    with sessions() as session:
        if not repository.revoke_api_key(session, key_id=args.key_id):
            raise CliError(f"no live key {args.key_id!r}; see `asyncthink keys list --all`")
    print(f"revoked key {args.key_id}")
    return 0
