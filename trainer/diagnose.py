"""Where a countdown model loses accuracy, read from its stored episodes (or from episode results).

Both teachers' trace formats are read:

- the search traces (:mod:`trainer.synth.search_teacher`): a candidate is every ``... hit EXPR`` line the
  organizer writes in its own units and every expression a model worker returns to a
  ``<JOIN-i>...</JOIN-i>``; what the ``verify`` tool said (``<FORK-i@verify>``) is read as the verified
  list, never as candidates;
- the paths traces (:mod:`trainer.synth.teacher`): ``found ...`` lines, joined takeaways, and a
  ``given N`` line (the bare target, which the shipped models' data counted as a solution).

Per episode it counts:

- candidates written, how many are not valid solutions (wrong arithmetic, a number not given or used
  twice, a path that misses the target, a bare or padded-bare number), and how many are a bare number;
- the answer's expressions (its first ``n_s``): how many are invalid and how many a bare number, how
  many distinct valid ones it holds, and how many of those no candidate line wrote;
- ``verify`` forks and ``check`` lines (a candidate re-derived in the text), and answer expressions that
  neither the tool nor a check line said ``ok`` to (only for traces that verify at all);
- first-pair units tried (forks to a model worker plus own ``pair`` lines) and whether that covers
  every pair.

Usage (after ``asyncthink eval ... --db URL``)::

    python -m trainer.diagnose --db sqlite:///asyncthink.db [--mode asyncthink] [--model-version V]

Limits: counts come from the trace text; a model trained on other traces gets only the answer counts
right.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, fields
from typing import Any

from shared.tasks.countdown import split_answer
from shared.tasks.expr import Canonical, ExprError, check_solution
from shared.tools import verified

_FOUND = re.compile(r"^found (.*)$", re.M)
_HIT = re.compile(r" hit (.+)$", re.M)
_FORK = re.compile(r"<FORK-(\d+)(?:@([\w.-]+))?>", re.S)
_JOINED = re.compile(r"<JOIN-(\d+)>(.*?)</JOIN-\1>", re.S)
_PAIR = re.compile(r"^pair ", re.M)
_CHECK = re.compile(r"^check (.+?): .*$", re.M)
_CHECK_OK = re.compile(r"^check (.+?): .* ok$", re.M)
_BARE = re.compile(r"^\s*\(*\s*\d+\s*\)*\s*$")


@dataclass
class TraceDiagnosis:
    candidates: int = 0  # candidate solutions written (hit and found lines, joined takeaways, given)
    invalid: int = 0  # of those, not a valid solution
    bare_candidates: int = 0  # of those, a bare number
    found: int = 0  # distinct valid solutions among them, capped at n_s
    answer_exprs: int = 0  # expressions in the answer (its first n_s)
    answer_invalid: int = 0  # of those, not a valid solution (duplicates are not counted here)
    answer_bare: int = 0  # of those, a bare number
    answered: int = 0  # distinct valid solutions in the answer
    answered_not_found: int = 0  # valid answer expressions that no candidate line wrote
    verify_forks: int = 0  # forks to the verify tool
    checks: int = 0  # candidates re-derived in the text (``check EXPR: steps verdict``, sequential traces)
    answered_not_verified: int = 0  # answer expressions never verified ok (by the tool or a check line)
    units: int = 0  # first-pair units tried: forks to a model worker plus the organizer's own ``pair`` lines
    all_pairs: bool = False  # the units cover every distinct pair of the numbers


def is_bare(text: str) -> bool:
    """Whether an expression is only a number (perhaps in parentheses)."""
    return bool(_BARE.match(text))


def _n_pairs(numbers: list[int]) -> int:
    pairs = {
        (max(numbers[i], numbers[j]), min(numbers[i], numbers[j]))
        for i in range(len(numbers))
        for j in range(i + 1, len(numbers))
    }
    return len(pairs)


def diagnose(payload: dict[str, Any], organizer_text: str, answer: str | None) -> TraceDiagnosis:
    """The diagnosis of one episode from its problem, organizer text and final answer."""
    numbers, target, need = list(payload["numbers"]), int(payload["target"]), int(payload["n_solutions"])
    endpoints = {int(m.group(1)): m.group(2) for m in _FORK.finditer(organizer_text)}
    joined = [(int(m.group(1)), m.group(2)) for m in _JOINED.finditer(organizer_text)]
    outside = _JOINED.sub("", organizer_text)  # the organizer's own text, without what joins injected
    texts = [part for m in _FOUND.finditer(outside) for part in m.group(1).split(";")]
    texts += [m.group(1) for m in _HIT.finditer(outside)]
    texts += [part for fid, body in joined if endpoints.get(fid) is None for part in body.split(";")]
    if re.search(r"^given ", outside, re.M):
        texts.append(str(target))
    ok_said: set[str] = set()
    for fid, body in joined:
        if endpoints.get(fid) == "verify":
            ok_said.update(e.strip() for e in verified(body))
    out = TraceDiagnosis()
    found: set[Canonical] = set()
    for text in (t.strip() for t in texts):
        if not text or text == "none":
            continue
        out.candidates += 1
        out.bare_candidates += is_bare(text)
        key = _key(text, numbers, target)
        if key is None:
            out.invalid += 1
        else:
            found.add(key)
    answered: set[Canonical] = set()
    for expr in split_answer(answer or "")[:need]:
        out.answer_exprs += 1
        out.answer_bare += is_bare(expr)
        key = _key(expr, numbers, target)
        if key is None:
            out.answer_invalid += 1
        else:
            answered.add(key)
    out.verify_forks = sum(1 for e in endpoints.values() if e == "verify")
    out.checks = len(_CHECK.findall(outside))
    ok_said.update(m.group(1).strip() for m in _CHECK_OK.finditer(outside))
    if out.verify_forks or out.checks:
        out.answered_not_verified = sum(1 for e in split_answer(answer or "")[:need] if e.strip() not in ok_said)
    out.found = min(need, len(found))
    out.answered = len(answered)
    out.answered_not_found = len(answered - found)
    out.units = len(_PAIR.findall(outside)) + sum(1 for e in endpoints.values() if e is None)
    out.all_pairs = out.units >= _n_pairs(numbers)
    return out


def _key(text: str, numbers: list[int], target: int) -> Canonical | None:
    try:
        return check_solution(text, numbers, target)
    except ExprError:
        return None


def summarize(diagnoses: list[TraceDiagnosis]) -> dict[str, float]:
    """Totals and per-episode means, with the shares of invalid and bare candidates and answers."""
    n = len(diagnoses)
    if not n:
        return {"episodes": 0}
    total = {f.name: float(sum(getattr(d, f.name) for d in diagnoses)) for f in fields(TraceDiagnosis)}
    return {
        "episodes": n,
        "candidates_per_episode": total["candidates"] / n,
        "invalid_candidates_pct": 100 * total["invalid"] / max(1.0, total["candidates"]),
        "bare_candidates_pct": 100 * total["bare_candidates"] / max(1.0, total["candidates"]),
        "found_per_episode": total["found"] / n,
        "answer_exprs_per_episode": total["answer_exprs"] / n,
        "invalid_answer_exprs_pct": 100 * total["answer_invalid"] / max(1.0, total["answer_exprs"]),
        "bare_answer_exprs_pct": 100 * total["answer_bare"] / max(1.0, total["answer_exprs"]),
        "episodes_with_bare_answer_pct": 100 * sum(d.answer_bare > 0 for d in diagnoses) / n,
        "answered_per_episode": total["answered"] / n,
        "answered_not_found_per_episode": total["answered_not_found"] / n,
        "verify_forks_per_episode": total["verify_forks"] / n,
        "checks_per_episode": total["checks"] / n,
        "answered_not_verified_per_episode": total["answered_not_verified"] / n,
        "units_per_episode": total["units"] / n,
        "all_pairs_pct": 100 * total["all_pairs"] / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True, help="database URL the episodes were stored in (asyncthink eval --db)")
    p.add_argument("--mode", default=None, help="only episodes of this mode (asyncthink, sequential, parallel)")
    p.add_argument("--model-version", default=None, help="only episodes of this model version")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)

    from shared.store.db import make_engine, session_factory
    from shared.store.repository import episode_segments, list_episodes

    sessions = session_factory(make_engine(args.db))
    out: list[TraceDiagnosis] = []
    with sessions() as session:
        episodes, _ = list_episodes(session, task="countdown", mode=args.mode,
                                        model_version=args.model_version, limit=1_000_000)
        for ep in episodes:
            organizer = next((s for s in episode_segments(session, ep.id) if s.role == "organizer"), None)
            if organizer is not None:
                out.append(diagnose(ep.problem.payload, organizer.text, ep.answer))
    summary = summarize(out)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for k, v in summary.items():
            print(f"{k:36s} {v:.2f}" if isinstance(v, float) else f"{k:36s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
