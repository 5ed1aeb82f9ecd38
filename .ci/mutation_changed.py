"""Mutation testing of the core files a change touches, bounded in time (CI; see docs/testing.md).

The change is ``BASE..HEAD``: BASE is ``--base REF`` (its merge base with HEAD), else HEAD's first parent,
else, for a root commit, the empty tree (every file is new); a shallow clone without the parent has
nothing to compare and is skipped with a message. Of the files the change adds or modifies, those in the
core list (pyproject's ``[tool.mutmut] only_mutate``) are mutated, and only those: mutmut runs in a
scratch directory that links to this checkout and holds a copy of pyproject.toml with ``only_mutate``
narrowed to them, so the checkout's pyproject.toml and its ``mutants/`` are never touched.

Each file's score is killed / (total - skipped): a mutant that no test covers counts as a survivor, one
whose tests ran out of time as killed (the suite would not pass with it). The run is ended after
``--time-limit`` seconds; the mutants it tested are scored and the untested ones are counted and named
(mutmut tests the quickest first). Exit status 1 when a changed file scores below ``--min-score``
percent, 0 otherwise; "no core file changed" and 0 when there is nothing to mutate.

    .venv/bin/python .ci/mutation_changed.py                       # the last commit, as CI runs it
    .venv/bin/python .ci/mutation_changed.py --base main           # everything a branch changed
    .venv/bin/python .ci/mutation_changed.py shared/rewards.py     # these core files, changed or not
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_SCORE = 85.0
TIME_LIMIT_S = 900

# mutmut's exit codes per mutant (mutmut/stats.py): 1 and 3 killed, 36 and the CPU-limit signals timeout,
# 34 skipped, 37 caught by the type checker; 0 survived, 33 and 5 no tests, None not checked yet.
KILLED = {1, 3, 37}
TIMEOUT = {36, 24, -24, 152, 255}
SKIPPED = {34}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def core_patterns(repo: Path) -> list[str]:
    """The core list: ``[tool.mutmut] only_mutate`` of the repository's pyproject.toml."""
    config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(config["only_mutate"])


class NoBase(Exception):
    """HEAD has a parent that this clone does not hold (a shallow clone)."""


def base_commit(repo: Path, base: str | None) -> str:
    """What HEAD is compared with: the merge base with ``base``, HEAD's parent, or the empty tree."""
    if base:
        return git(repo, "merge-base", base, "HEAD").strip()
    parent = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "-q", "HEAD~1"], capture_output=True, text=True, timeout=60
    )
    if parent.returncode == 0:
        return parent.stdout.strip()
    if git(repo, "rev-parse", "--is-shallow-repository").strip() == "true":
        raise NoBase("HEAD's parent is not in this shallow clone")
    return git(repo, "hash-object", "-t", "tree", "/dev/null").strip()  # a root commit: all of it is new


def changed_files(repo: Path, base: str | None = None) -> list[str]:
    """Files added or modified between the base and HEAD (deleted ones have nothing left to mutate)."""
    out = git(repo, "diff", "--name-only", "--no-renames", "--diff-filter=d", base_commit(repo, base), "HEAD")
    return [line for line in out.splitlines() if line]


def select(changed: list[str], patterns: list[str]) -> list[str]:
    """The changed files that are core modules, sorted."""
    return sorted(f for f in changed if any(fnmatch.fnmatch(f, p) for p in patterns))


def narrowed_pyproject(text: str, files: list[str]) -> str:
    """pyproject.toml's text with ``[tool.mutmut] only_mutate`` set to ``files``."""
    new, n = re.subn(r"(?m)^only_mutate = \[[^\]]*\]", "only_mutate = " + json.dumps(files), text)
    if n != 1:
        raise SystemExit("pyproject.toml: expected one `only_mutate = [...]` line in [tool.mutmut]")
    return new


@dataclass(frozen=True)
class Score:
    path: str
    killed: int  # killed, timed out or caught by the type checker
    total: int  # the tested mutants, skipped ones left out
    survivors: tuple[str, ...]  # survived, no tests, suspicious, segfault...
    untested: tuple[str, ...] = ()  # not checked: the time limit ended the run first

    @property
    def percent(self) -> float:
        return 100.0 * self.killed / self.total if self.total else 100.0


def score_of(path: str, exit_codes: dict[str, int | None]) -> Score:
    untested = tuple(sorted(name for name, code in exit_codes.items() if code is None))
    counted = {name: code for name, code in exit_codes.items() if code is not None and code not in SKIPPED}
    caught = [name for name, code in counted.items() if code in KILLED or code in TIMEOUT]
    survivors = tuple(sorted(set(counted) - set(caught)))
    return Score(path, len(caught), len(counted), survivors, untested)


def read_scores(mutants: Path, files: list[str]) -> list[Score]:
    """Each file's score from mutmut's ``mutants/<file>.meta`` (no mutant at all: 0/0, 100 %)."""
    scores = []
    for path in files:
        meta = mutants / (path + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        scores.append(score_of(path, codes))
    return scores


def scratch_checkout(repo: Path, files: list[str]) -> Path:
    """A directory whose entries link to the repository's, except a pyproject.toml narrowed to ``files``."""
    scratch = Path(tempfile.mkdtemp(prefix="asyncthink-mutation-"))
    for entry in repo.iterdir():
        if entry.name not in ("pyproject.toml", "mutants", ".git"):
            (scratch / entry.name).symlink_to(entry)
    (scratch / "pyproject.toml").write_text(narrowed_pyproject((repo / "pyproject.toml").read_text(), files))
    return scratch


def run_mutmut(scratch: Path, time_limit: float, log: Path) -> bool:
    """``mutmut run --max-children 2`` in the scratch directory; False when the time limit ended it."""
    mutmut = Path(sys.executable).parent / "mutmut"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(mutmut), "run", "--max-children", "2"], cwd=scratch, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout ends mutmut's workers too
        )
        try:
            proc.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return False
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-40:]
        print("\n".join(tail))
        raise SystemExit(f"mutmut run failed (exit {proc.returncode}); its output is above")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mutation testing of the core files a change touches")
    parser.add_argument("files", nargs="*", help="core files to mutate instead of the changed ones")
    parser.add_argument("--base", help="compare HEAD with its merge base with this ref (default: HEAD~1)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds (default 900)")
    parser.add_argument("--min-score", type=float, default=MIN_SCORE, help="percent (default 85)")
    parser.add_argument("--repo", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    try:
        candidates = args.files or changed_files(args.repo, args.base)
    except NoBase as why:
        print(f"mutation testing: skipped, {why} (fetch more history, or pass --base)")
        return 0
    files = select(candidates, core_patterns(args.repo))
    if not files:
        print("mutation testing: " + ("none of these is a core file" if args.files else "no core file changed"))
        return 0
    print(f"mutation testing of {', '.join(files)} (at most {args.time_limit:.0f} s)", flush=True)
    scratch = scratch_checkout(args.repo, files)
    try:
        finished = run_mutmut(scratch, args.time_limit, scratch / "mutmut.log")
        scores = read_scores(scratch / "mutants", files)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not finished:
        print(f"the time limit ({args.time_limit:.0f} s) ended the run: the scores are of the mutants it tested")
    failed = False
    for s in scores:
        low = s.percent < args.min_score
        failed |= low
        verdict = f"  BELOW {args.min_score:g} %" if low else ""
        left = f", {len(s.untested)} not tested in time" if s.untested else ""
        print(f"{s.path}: {s.killed}/{s.total} killed ({s.percent:.1f} %){left}{verdict}")
        for name in s.survivors:
            print(f"    not killed: {name}")
    if failed:
        print("see each survivor with `.venv/bin/mutmut show NAME` after a `.venv/bin/mutmut run` (docs/testing.md)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
