"""Programmatic teacher for 4×4 Sudoku: AsyncThink and sequential traces from a propagation solver.

The solver fills the grid by **elimination passes over units** (a row, a column or a 2×2 box): for
each blank cell of the unit it lists the digits the cell sees in its row, column and box and keeps
the rest as candidates; a cell with one candidate is filled (naked single), and a digit the unit
lacks that fits only one of its cells goes there (hidden single). Both rules are sound, so passes
run on stale grids (a worker forked before another result came back) never disagree; on generated
(minimal, unique) puzzles they always finish the grid, in 4-6 passes.

Each pass is one unit of work, written the same way by a worker or by the organizer. A worker's
sub-query is the unit and the grid it was forked with; its trace looks like::

    prompt:     Worker. col 2 | .3.. ...4 .1.. ...1\n
    completion: r2c2: row 4, col 1 3, box 3 -> 2
                r4c2: row 1, col 1 3, box 1 -> 2 4
                4 only r4c2
                <RETURN>r2c2=2 r4c2=4</RETURN>

The organizer notes the givens (``grid <rows>``), then follows a sampled skeleton
(:mod:`trainer.synth.structure`): it forks some passes and does others itself between forks and
joins (``row 3`` + the same lines + ``found r3c1=2 ...``), writes the updated ``grid <rows>`` after
each pass it does and each join, and answers the filled grid, rows separated by spaces. A
sequential trace does every pass itself, in order, with the same text.

Which unit a pass takes: among the units no running worker holds, the one that fills the most cells
no running worker will fill (the teacher knows), then the one with fewest blanks, then rows before
columns before boxes, by number. The skeleton's length is fitted to the search: the sequential pass
count, then one more or fewer; a skeleton that leaves a pass with nothing new to fill, or the grid
unfinished, is resampled (a few tries; ``no_fit`` when none fits). A puzzle that elimination cannot
finish (only user puzzles with several solutions, in practice) is dropped as ``stuck``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from shared.tasks.base import Problem
from shared.tasks.sudoku import SIZE, grid_text, parse_grid
from trainer.synth.records import (
    Episode,
    OrganizerWriter,
    TraceRecord,
    check_episode,
    check_sequential,
    organizer_record,
    sequential_record,
    worker_record,
)
from trainer.synth.structure import Skeleton, SkeletonTeacher, StepKind

OPENER = "fill by row, col, box\n"  # the organizer's brief plan before it notes the givens

Grid = tuple[int, ...]  # 16 cells, row by row, 0 = blank


@dataclass(frozen=True)
class Region:
    """A row, column or 2×2 box: the scope of one elimination pass."""

    name: str  # "row 1", "col 3", "box 2" (boxes numbered row by row)
    cells: tuple[int, ...]  # cell indices 0-15, in reading order


def _regions() -> tuple[Region, ...]:
    rows = [Region(f"row {r + 1}", tuple(r * SIZE + c for c in range(SIZE))) for r in range(SIZE)]
    cols = [Region(f"col {c + 1}", tuple(r * SIZE + c for r in range(SIZE))) for c in range(SIZE)]
    boxes = [
        Region(
            f"box {b + 1}",
            tuple((2 * (b // 2) + i) * SIZE + 2 * (b % 2) + j for i in range(2) for j in range(2)),
        )
        for b in range(SIZE)
    ]
    return (*rows, *cols, *boxes)


REGIONS = _regions()  # rows, then columns, then boxes: the tie-break order
ROW_OF = {i: REGIONS[i // SIZE] for i in range(SIZE * SIZE)}
COL_OF = {i: REGIONS[SIZE + i % SIZE] for i in range(SIZE * SIZE)}
BOX_OF = {i: REGIONS[2 * SIZE + 2 * (i // SIZE // 2) + (i % SIZE) // 2] for i in range(SIZE * SIZE)}


def cell_name(i: int) -> str:
    return f"r{i // SIZE + 1}c{i % SIZE + 1}"


def rows_text(grid: Sequence[int]) -> str:
    """``1.3. .... ..2. 4...``: the grid as the organizer prompt shows it."""
    text = grid_text(list(grid))
    return " ".join(text[r * SIZE : (r + 1) * SIZE] for r in range(SIZE))


def _digits(grid: Grid, region: Region) -> list[int]:
    return sorted(grid[j] for j in region.cells if grid[j])


def _listed(digits: list[int]) -> str:
    return " ".join(map(str, digits)) or "-"


@dataclass(frozen=True)
class Pass:
    """One elimination pass of one region on one grid state, ready for a worker or the organizer."""

    region: Region
    grid: Grid  # the grid the pass saw
    lines: tuple[str, ...]  # one line per blank cell, then one per hidden single
    fills: tuple[tuple[int, int], ...]  # (cell, digit), in cell order

    @property
    def query(self) -> str:
        return f"{self.region.name} | {rows_text(self.grid)}"

    @property
    def returned(self) -> str:
        return " ".join(f"{cell_name(i)}={d}" for i, d in self.fills) or "none"

    def worker_text(self) -> str:
        return "\n".join(self.lines) + f"\n<RETURN>{self.returned}</RETURN>"

    def organizer_text(self) -> str:
        return f"{self.region.name}\n" + "\n".join(self.lines) + f"\nfound {self.returned}\n"


def eliminate(grid: Grid, region: Region) -> Pass:
    """The pass of ``region`` on ``grid``: candidate lines, then naked and hidden singles."""
    blanks = [i for i in region.cells if not grid[i]]
    lines: list[str] = []
    cands: dict[int, list[int]] = {}
    for i in blanks:
        row, col, box = _digits(grid, ROW_OF[i]), _digits(grid, COL_OF[i]), _digits(grid, BOX_OF[i])
        seen = set(row) | set(col) | set(box)
        cands[i] = [d for d in range(1, SIZE + 1) if d not in seen]
        lines.append(
            f"{cell_name(i)}: row {_listed(row)}, col {_listed(col)}, box {_listed(box)} -> {_listed(cands[i])}"
        )
    fills = {i: c[0] for i, c in cands.items() if len(c) == 1}
    present = set(_digits(grid, region))
    for d in range(1, SIZE + 1):
        where = [i for i in blanks if d in cands[i]]
        if d not in present and len(where) == 1 and where[0] not in fills:
            fills[where[0]] = d
            lines.append(f"{d} only {cell_name(where[0])}")
    return Pass(region, grid, tuple(lines), tuple(sorted(fills.items())))


def choose(grid: Grid, busy: set[str], pending: set[int]) -> Pass | None:
    """The next pass (see the module docstring), or None when no free region fills a new cell."""
    best: tuple[tuple[int, int, int], Pass] | None = None
    for k, region in enumerate(REGIONS):
        blanks = sum(not grid[i] for i in region.cells)
        if region.name in busy or not blanks:
            continue
        p = eliminate(grid, region)
        new = sum(i not in pending for i, _ in p.fills)
        if new and (best is None or (-new, blanks, k) < best[0]):
            best = ((-new, blanks, k), p)
    return best[1] if best else None


def _apply(grid: Grid, p: Pass) -> Grid:
    cells = list(grid)
    for i, d in p.fills:
        cells[i] = d
    return tuple(cells)


def solve_passes(grid: Grid) -> list[Pass] | None:
    """The passes one thread makes, in order, until the grid is full; None when elimination stalls."""
    out: list[Pass] = []
    while 0 in grid:
        p = choose(grid, set(), set())
        if p is None:
            return None
        out.append(p)
        grid = _apply(grid, p)
    return out


@dataclass
class SudokuTeacher(SkeletonTeacher):
    """Writes AsyncThink episodes and sequential traces for 4×4 Sudoku (see module docstring).

    Every trace answers in full, so ``partial`` stays empty."""

    tries: int = 24  # skeletons sampled per problem before it is dropped as ``no_fit``

    @staticmethod
    def givens(problem: Problem) -> Grid:
        return tuple(parse_grid(problem.payload["puzzle"]))

    # ----------------------------------------------------------------------------- writing
    def write_episode(self, problem: Problem, skeleton: Skeleton, episode_id: str) -> Episode | None:
        """The episode that follows ``skeleton``; None when it does not fit the search (a pass with
        nothing new to fill, or the grid unfinished at the end)."""
        grid = self.givens(problem)
        w = OrganizerWriter()
        w.think(f"{OPENER}grid {rows_text(grid)}\n")
        workers: dict[int, TraceRecord] = {}
        active: dict[int, Pass] = {}  # fork id -> the pass its worker makes

        def pending() -> set[int]:
            return {i for p in active.values() for i, _ in p.fills}

        for step in skeleton.steps:
            if step.kind is StepKind.JOIN:
                assert step.fork_id is not None
                p = active.pop(step.fork_id)
                w.join(step.fork_id, p.returned)
                grid = _apply(grid, p)
                w.think(f"\ngrid {rows_text(grid)}\n")
                continue
            chosen = choose(grid, {a.region.name for a in active.values()}, pending())
            if chosen is None:
                return None
            if step.kind is StepKind.FORK:
                assert step.fork_id is not None
                active[step.fork_id] = chosen
                w.fork(step.fork_id, chosen.query)
                w.think("\n")
                workers[step.fork_id] = worker_record(
                    self.task, problem, episode_id=episode_id, fork_id=step.fork_id, query=chosen.query,
                    completion=chosen.worker_text(), capacity=skeleton.capacity, topology=skeleton.topology,
                )
            else:
                grid = _apply(grid, chosen)
                w.think(chosen.organizer_text() + f"grid {rows_text(grid)}\n")
        if 0 in grid:
            return None
        w.answer(rows_text(grid))
        organizer = organizer_record(
            self.task, problem, w, episode_id=episode_id, capacity=skeleton.capacity, topology=skeleton.topology
        )
        return Episode(problem, organizer, workers)

    def write_sequential(self, problem: Problem, passes: list[Pass]) -> TraceRecord:
        grid = self.givens(problem)
        parts = [f"{OPENER}grid {rows_text(grid)}\n"]
        for p in passes:
            grid = _apply(grid, p)
            parts.append(p.organizer_text() + f"grid {rows_text(grid)}\n")
        parts.append(f"<ANSWER>{rows_text(grid)}</ANSWER>")
        return sequential_record(self.task, problem, "".join(parts))

    # ----------------------------------------------------------------------------- checked output
    def episode(self, problem: Problem, rng: random.Random) -> Episode | None:
        """A checked AsyncThink episode, or None (the reason is counted in ``dropped``)."""
        passes = solve_passes(self.givens(problem))
        if passes is None:
            self.dropped["stuck"] += 1
            return None
        n = len(passes)
        sizes = [s for s in (n, n + 1, n - 1, n + 2) if s >= 1]
        ep: Episode | None = None
        for k in range(self.tries):
            skeleton = self.skeleton(rng, sizes[k % len(sizes)])
            ep = self.write_episode(problem, skeleton, f"{problem.id}-at")
            if ep is not None:
                break
        if ep is None:
            self.dropped["no_fit"] += 1
            return None
        reason = check_episode(self.task, ep, self.capacity)
        if reason:
            self.dropped[reason] += 1
            return None
        return ep

    def sequential(self, problem: Problem) -> TraceRecord | None:
        """A checked sequential trace, or None (the reason is counted in ``dropped``)."""
        passes = solve_passes(self.givens(problem))
        if passes is None:
            self.dropped["stuck"] += 1
            return None
        rec = self.write_sequential(problem, passes)
        reason = check_sequential(self.task, problem, rec)
        if reason:
            self.dropped[reason] += 1
            return None
        return rec
