"""The ``asyncthink`` command line: thin verbs that parse arguments and call the library.

This package sits above the others: it imports ``shared``, ``services`` and ``trainer``, and nothing
imports it. Heavy imports (torch, transformers, SQLAlchemy, FastAPI) happen inside the verb that needs
them, so ``asyncthink --help`` is instant. Options that set a config's fields are generated from the
config (:mod:`cli.options`), so each has one help text. Verbs:

    solve   one problem: the answer, a readable trace, T, η and wall time
    eval    many problems in one or more modes, stored; a table, --json, --plot
    trace   show a stored episode
    db      database migrations
    keys    the gateway's API keys: create (printed once), list, revoke
    serve   run the gateway, the organizer or the trainer service
    trainer the trainer service's operator verbs (versions, show, promote, rollback, pause, resume)
    model   build a small model from a config with a locally trained tokenizer
    synth / sft / grpo   training (the work is in ``trainer/``)
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
    from cli import db, keys, run, train, trainer, up

    parser = argparse.ArgumentParser(
        prog="asyncthink",
        description="Asynchronous thinking: a model that forks sub-queries to concurrent workers and joins them.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    run.register(sub)
    db.register(sub)
    keys.register(sub)
    train.register(sub)
    up.register(sub)
    trainer.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # services say what they do at INFO (listening, consuming, each episode); one-shot verbs stay quiet
    base = logging.INFO if args.verb in ("serve", "up") else logging.WARNING
    level = max(logging.DEBUG, base - 10 * min(args.verbose, 2))
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
