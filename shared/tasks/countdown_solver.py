"""Exhaustive countdown solver and the problem generator's solution counts, under the task's rules.

A solution uses at least two of the numbers (each at most once) and is distinct in the sense of
:mod:`shared.tasks.expr` (padding does not make a new solution; a bare number, padded or not, is none).
The solver tries every sub-multiset of at least two numbers and every binary tree
over it with + − × ÷ (fractions allowed on the way, division by zero skipped). It is memoized over
sub-multisets: for each one, a table ``value -> {flat form -> readable expression}``. The flat form
(:func:`shared.tasks.expr.flat_combine`: commutativity, associativity, signed terms) of ``a op b`` is a
function of the flat forms of ``a`` and ``b``, so keeping one expression per flat form loses no
solution; solutions are then counted by canonical form (``reduce_form`` of the flat form).
The full set of numbers is never tabulated: its hits on the target are found by looking up, for each
left value, the right value each operator needs.

Limits: meant for 4 numbers (a few ms per problem); 5 is fine, 6 takes seconds and a lot of memory.
Tables are cached (LRU) across calls so a generator that revisits numbers is cheaper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from functools import lru_cache
from itertools import combinations

from shared.tasks.expr import (
    ATOM_PRECEDENCE,
    PRECEDENCE,
    Canonical,
    flat_combine,
    join_text,
    number_count,
    number_form,
    reduce_form,
)

# A leaf of an expression tree: (value, flat form, text, precedence of its top operator).
# Plain numbers are leaves; so is a pre-combined pair in :func:`solutions_starting_with`.
Leaf = tuple[Fraction, Canonical, str, int]
# flat form -> (text, precedence); a table maps each value to its bucket
Bucket = dict[Canonical, tuple[str, int]]
Table = dict[Fraction, Bucket]

_OPS = ("+", "-", "*", "/")


def number_leaf(n: int) -> Leaf:
    return Fraction(n), number_form(n), str(n), ATOM_PRECEDENCE


def apply_op(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    """``a op b`` exactly; None for a division by zero."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


def _splits(ms: tuple[Leaf, ...]) -> Iterable[tuple[tuple[Leaf, ...], tuple[Leaf, ...]]]:
    """Every ordered split of a sorted multiset into two non-empty parts, each distinct split once."""
    n = len(ms)
    seen: set[tuple[Leaf, ...]] = set()
    for mask in range(1, (1 << n) - 1):
        left = tuple(ms[i] for i in range(n) if mask >> i & 1)
        if left in seen:
            continue
        seen.add(left)
        yield left, tuple(ms[i] for i in range(n) if not mask >> i & 1)


def _add(out: Table, value: Fraction, key: Canonical, text: str, prec: int) -> None:
    bucket = out.setdefault(value, {})
    if key not in bucket:
        bucket[key] = (text, prec)


def _combine_into(out: Table, op: str, value: Fraction, a: Bucket, b: Bucket) -> None:
    """Add ``a op b`` (of value ``value``) for every pair of canonical forms in the two buckets."""
    prec = PRECEDENCE[op]
    for a_key, a_entry in a.items():
        for b_key, b_entry in b.items():
            _add(out, value, flat_combine(op, a_key, b_key), join_text(op, a_entry, b_entry), prec)


@lru_cache(maxsize=8192)
def _table(ms: tuple[Leaf, ...]) -> Table:
    """Every value reachable using *all* leaves of the sorted multiset ``ms`` exactly once."""
    return _tabulate(ms, None)


def _tabulate(ms: tuple[Leaf, ...], keep: Callable[[Fraction], bool] | None) -> Table:
    """Like :func:`_table`, keeping only values for which ``keep`` is true (all when None)."""
    if len(ms) == 1:
        value, key, text, prec = ms[0]
        return {value: {key: (text, prec)}} if keep is None or keep(value) else {}
    out: Table = {}
    for left, right in _splits(ms):
        left_table, right_table = _table(left), _table(right)
        for a_value, a in left_table.items():
            for b_value, b in right_table.items():
                for op in _OPS:
                    if op in "+*" and left > right:
                        continue  # commutative: the mirrored split adds the same forms
                    result = apply_op(op, a_value, b_value)
                    if result is not None and (keep is None or keep(result)):
                        _combine_into(out, op, result, a, b)
    return out


def _needed(op: str, a: Fraction, target: Fraction) -> Fraction | None:
    """The right operand ``b`` with ``a op b == target``, None when there is none or it is not unique."""
    if op == "+":
        return target - a
    if op == "-":
        return a - target
    if op == "*":
        return target / a if a != 0 else None
    return a / target if target != 0 else None


def _hits(ms: tuple[Leaf, ...], target: Fraction) -> Table:
    """Like ``_table(ms)`` restricted to the target value, without tabulating ``ms`` itself."""
    if len(ms) == 1:
        return {target: dict(_table(ms)[target])} if target in _table(ms) else {}
    out: Table = {}
    for left, right in _splits(ms):
        left_table, right_table = _table(left), _table(right)
        for a_value, a in left_table.items():
            for op in _OPS:
                needed = _needed(op, a_value, target)
                if needed is None:  # a*b with a == 0, or a/b with target 0: try every b
                    candidates = list(right_table.items())
                elif needed in right_table:
                    candidates = [(needed, right_table[needed])]
                else:
                    continue
                for b_value, b in candidates:
                    if apply_op(op, a_value, b_value) == target:
                        _combine_into(out, op, target, a, b)
    return out


def _sub_multisets(ms: tuple[Leaf, ...], smallest: int = 1) -> list[tuple[Leaf, ...]]:
    """All distinct sub-multisets of at least ``smallest`` leaves, smallest first."""
    subs: dict[tuple[Leaf, ...], None] = {}
    for size in range(smallest, len(ms) + 1):
        for combo in combinations(ms, size):
            subs.setdefault(combo, None)
    return list(subs)


def _solve_leaves(leaves: Sequence[Leaf], target: int, must_use: Leaf | None = None) -> dict[Canonical, str]:
    """Solutions over sub-multisets of ``leaves`` (plus ``must_use`` in every one, when given)."""
    goal = Fraction(target)
    found: dict[Canonical, str] = {}
    if must_use is None:
        subs = _sub_multisets(tuple(sorted(leaves)), smallest=2)
    else:
        subs = [(must_use,)] + [tuple(sorted((*sub, must_use))) for sub in _sub_multisets(tuple(sorted(leaves)))]
    for sub in subs:
        for flat, (text, _) in _hits(sub, goal).get(goal, {}).items():
            key = reduce_form(flat)
            if number_count(key) >= 2:  # a (padded) bare number is not a solution
                found.setdefault(key, text)
    return found


def solve(numbers: Sequence[int], target: int) -> dict[Canonical, str]:
    """Every distinct solution: canonical form -> one readable expression using the fewest numbers.

    >>> sorted(solve([2, 3], 6).values())
    ['2*3']
    """
    return _solve_leaves([number_leaf(n) for n in numbers], target)


def count_solutions(numbers: Sequence[int], target: int) -> int:
    return len(solve(numbers, target))


def solutions_starting_with(numbers: Sequence[int], target: int, pair: tuple[int, int]) -> list[str]:
    """Solutions in which the two numbers of ``pair`` are combined with each other directly.

    For a programmatic teacher that hands a worker "try combining a and b first": the pair is
    pre-combined with each of + − × ÷ (both orders) into one leaf, and the rest is solved as usual.
    Pre-combinations that are pure padding (``a−a`` = 0, ``a/a`` = 1) are skipped. One expression per
    canonical form, in a deterministic order; ValueError if ``pair`` is not drawn from ``numbers``.
    """
    rest = list(numbers)
    for n in pair:
        if n not in rest:
            raise ValueError(f"pair {pair} is not drawn from numbers {list(numbers)}")
        rest.remove(n)
    a, b = number_leaf(pair[0]), number_leaf(pair[1])
    found: dict[Canonical, str] = {}
    for op in _OPS:
        for left, right in ((a, b), (b, a)):
            value = apply_op(op, left[0], right[0])
            if value is None or (op == "-" and value == 0) or (op == "/" and value == 1):
                continue
            leaf = (
                value,
                flat_combine(op, left[1], right[1]),
                join_text(op, left[2:], right[2:]),
                PRECEDENCE[op],
            )
            rest_leaves = [number_leaf(n) for n in rest]
            for key, text in _solve_leaves(rest_leaves, target, must_use=leaf).items():
                found.setdefault(key, text)
    return list(found.values())


def solution_counts(numbers: Sequence[int], target_low: int, target_high: int) -> dict[int, int]:
    """How many distinct solutions each integer target in [target_low, target_high] has (0 omitted).

    One pass for all targets: what a generator needs to pick a target with enough solutions.
    """

    def in_range(value: Fraction) -> bool:
        return value.denominator == 1 and target_low <= value <= target_high

    found: dict[int, set[Canonical]] = {}
    full = tuple(sorted(number_leaf(n) for n in numbers))
    for sub in _sub_multisets(full, smallest=2):
        table = _tabulate(sub, in_range) if sub == full else _table(sub)
        for value, bucket in table.items():
            if in_range(value):
                keys = (reduce_form(flat) for flat in bucket)
                found.setdefault(int(value), set()).update(k for k in keys if number_count(k) >= 2)
    return {target: len(keys) for target, keys in sorted(found.items()) if keys}
