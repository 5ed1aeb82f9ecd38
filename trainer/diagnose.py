"""Where a countdown model loses accuracy, read from its stored episodes.

The programmatic teacher's traces (:mod:`trainer.synth.teacher`) write every solution a unit finds on a
``found ...`` line (the organizer's own units) or return it to a ``<JOIN-i>...</JOIN-i>`` (a worker's
unit), note a target that is one of the numbers as ``given``, and answer with up to ``n_s`` of the
solutions found. So a stored episode tells, per problem:

- how many candidate solutions the trace wrote, and how many of those are not valid (bad arithmetic or
  a path that misses the target),
- how many distinct valid ones it found (capped at ``n_s``) against how many its answer holds (an answer
  that drops or garbles found solutions loses accuracy after the search),
- how many first-pair units it tried (forks plus own ``pair`` lines) and whether that covers every pair.

Usage (after ``asyncthink eval ... --db URL``)::

    python -m trainer.diagnose --db sqlite:///asyncthink.db [--mode asyncthink] [--model-version V]

Limits: it reads the teacher's trace format; a model trained on other traces gets only the answer
counts right.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, fields
from typing import Any

from shared.tasks.countdown import split_answer
from shared.tasks.expr import Canonical, ExprError, check_solution
from trainer.synth.teacher import pairs_in_order

_FOUND = re.compile(r"^found (.*)$", re.M)
_JOINED = re.compile(r"<JOIN-\d+>(.*?)</JOIN-\d+>", re.S)
_UNIT = re.compile(r"^pair |<FORK-\d+>", re.M)


@dataclass
class TraceDiagnosis:
    candidates: int = 0  # candidate solutions written (found lines, joined takeaways, given)
    invalid: int = 0  # of those, not a valid solution
    found: int = 0  # distinct valid solutions among them, capped at n_s
    answered: int = 0  # distinct valid solutions in the answer (its first n_s expressions)
    answered_not_found: int = 0  # valid answer expressions that no unit wrote
    units: int = 0  # first-pair units tried: forks plus the organizer's own ``pair`` lines
    all_pairs: bool = False  # the units cover every distinct pair of the numbers


def diagnose(payload: dict[str, Any], organizer_text: str, answer: str | None) -> TraceDiagnosis:
    """The diagnosis of one episode from its problem, organizer text and final answer."""
    numbers, target, need = list(payload["numbers"]), int(payload["target"]), int(payload["n_solutions"])
    texts = [part for m in _FOUND.finditer(organizer_text) for part in m.group(1).split(";")]
    texts += [part for m in _JOINED.finditer(organizer_text) for part in m.group(1).split(";")]
    if re.search(r"^given ", organizer_text, re.M):
        texts.append(str(target))
    out = TraceDiagnosis()
    found: set[Canonical] = set()
    for text in (t.strip() for t in texts):
        if not text or text == "none":
            continue
        out.candidates += 1
        key = _key(text, numbers, target)
        if key is None:
            out.invalid += 1
        else:
            found.add(key)
    answered = {k for k in (_key(e, numbers, target) for e in split_answer(answer or "")[:need]) if k is not None}
    out.found = min(need, len(found))
    out.answered = len(answered)
    out.answered_not_found = len(answered - found)
    out.units = len(_UNIT.findall(organizer_text))
    out.all_pairs = out.units >= len(pairs_in_order(numbers))
    return out


def _key(text: str, numbers: list[int], target: int) -> Canonical | None:
    try:
        return check_solution(text, numbers, target)
    except ExprError:
        return None


def summarize(diagnoses: list[TraceDiagnosis]) -> dict[str, float]:
    """Totals and per-episode means, with the share of invalid candidates and of full pair coverage."""
    n = len(diagnoses)
    if not n:
        return {"episodes": 0}
    total = {f.name: float(sum(getattr(d, f.name) for d in diagnoses)) for f in fields(TraceDiagnosis)}
    return {
        "episodes": n,
        "candidates_per_episode": total["candidates"] / n,
        "invalid_candidates_pct": 100 * total["invalid"] / max(1.0, total["candidates"]),
        "found_per_episode": total["found"] / n,
        "answered_per_episode": total["answered"] / n,
        "answered_not_found_per_episode": total["answered_not_found"] / n,
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
            print(f"{k:32s} {v:.2f}" if isinstance(v, float) else f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

