"""The ``asyncthink`` command line: thin verbs that parse arguments and call library functions.

Heavy imports (torch, transformers, SQLAlchemy, FastAPI) happen inside the verb that needs them, so
``asyncthink --help`` is instant. Verbs:

    solve   one problem: the answer, a readable trace, T, η and wall time
    eval    many problems in one or more modes, stored; a table, --json, --plot
    trace   show a stored episode
    db      database migrations
    model   build a small model from a config with a locally trained tokenizer
    serve   run the gateway, the organizer service (distributed setup)
    synth / sft / grpo   training (see ``trainer/``)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

Verb = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from shared.cli import db, run, train_verbs

    parser = argparse.ArgumentParser(
        prog="asyncthink",
        description="Asynchronous thinking: a model that forks sub-queries to concurrent workers and joins them.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    run.register(sub)
    db.register(sub)
    train_verbs.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"asyncthink {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
