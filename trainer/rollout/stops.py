"""Cheap stop-pattern checks for the slot engine.

Decoding every slot's text after every token would cost more CPU than the GPU step itself at
batch 1024. So the engine re-checks a request's stop regex only after a token that *can end a
match*: from the compiled pattern we derive the set of characters a match can end with (for the
protocol's tags, ``>``), and precompute which vocabulary ids decode to text containing one of them.
A token outside that set cannot complete a match, so skipping the check there loses nothing. Where
the last character cannot be pinned down (a pattern ending in ``\\w``, ``.``, a class range, a
non-ASCII character or an empty match), :func:`trigger_chars` returns ``None`` and the engine checks
after every token of that request.

Limits: a stop that a later token merely *extends* (a pattern like ``>\\s*`` that could still grow)
is checked once, at the token that first completes a match, so the matched text is the shortest
completed one at that moment; a tokenizer whose single-token decode drops ASCII characters (none we
know of) would defeat the trigger table.
"""

from __future__ import annotations

import re
import re._constants as _C  # the stdlib regex parser's opcodes
import re._parser as sre_parse  # the stdlib's own regex parser (sre_parse before 3.11)
from collections.abc import Callable, Sequence
from typing import Any


def _last_chars(items: Sequence[tuple[Any, Any]]) -> set[str] | None:
    """Characters the sequence ``items`` can end with, or ``None`` when unknown / possibly empty."""
    for i in range(len(items) - 1, -1, -1):
        op, av = items[i]
        if op is _C.AT:  # zero-width anchor: look further left
            continue
        if op is _C.LITERAL:
            return {chr(av)}
        if op is _C.IN:
            if all(sub_op is _C.LITERAL for sub_op, _ in av):
                return {chr(code) for _, code in av}
            return None
        if op is _C.BRANCH:
            out: set[str] = set()
            for branch in av[1]:
                chars = _last_chars(list(branch))
                if chars is None:
                    return None
                out |= chars
            return out
        if op is _C.SUBPATTERN:
            return _last_chars(list(av[-1]))
        if op in (_C.MAX_REPEAT, _C.MIN_REPEAT, _C.POSSESSIVE_REPEAT):
            low, _high, sub = av
            chars = _last_chars(list(sub))
            if chars is None:
                return None
            if low >= 1:
                return chars
            before = _last_chars(items[:i])
            return None if before is None else chars | before
        return None
    return None


def trigger_chars(pattern: re.Pattern[str]) -> frozenset[str] | None:
    """ASCII characters that every match of ``pattern`` ends with, or ``None`` (check every token)."""
    try:
        parsed = sre_parse.parse(pattern.pattern, pattern.flags)
    except Exception:  # an exotic pattern: stay correct, check every token
        return None
    chars = _last_chars(list(parsed))
    if not chars:
        return None
    cased = {c.lower() for c in chars} | {c.upper() for c in chars}
    if any(not c.isascii() for c in cased):
        return None
    return frozenset(cased)


def trigger_ids(decode: Callable[[list[int]], str], vocab_size: int, chars: frozenset[str]) -> frozenset[int]:
    """Vocabulary ids whose single-token decode contains one of ``chars``."""
    out = []
    for tok in range(vocab_size):
        try:
            text = decode([tok])
        except Exception:  # ids past the tokenizer's vocabulary (a padded embedding): never emitted
            continue
        if any(c in text for c in chars):
            out.append(tok)
    return frozenset(out)
