"""Countdown expressions: a safe parser, exact evaluation, and the canonical form behind "distinct".

Parsing is a hand-written tokenizer plus recursive descent; nothing is ever passed to ``eval``.
Accepted: non-negative integer literals (ASCII digits), ``+``, ``-`` (also ``−`` and ``–``), ``*``
(also ``×``, ``x``, ``X``, ``·``, ``⋅``), ``/`` (also ``÷``), parentheses and whitespace. Rejected with
:class:`ExprError`: unary minus, decimals, powers, any other character, more than ``MAX_EXPR_CHARS``
characters or more than ``MAX_DEPTH`` nested parentheses. Evaluation is exact (``fractions.Fraction``);
division by zero is an :class:`ExprError`.

Canonical form (the task's rule for "distinct"). Two solutions are the same when they are equal after

* commutativity and associativity of ``+`` and ``×``;
* rewriting ``−`` and ``÷`` as signed terms and inverse factors (``a−(b−c) = a−b+c``,
  ``a/(b/c) = a·c/b``);
* dropping neutral padding: a factor or divisor whose value is 1, a term whose value is 0, and pairs
  that cancel (``·a/a``, ``+a−a``).

Because associativity lets any group of terms or factors be parenthesised, "a term whose value is 0"
covers every *group* of terms that sums to 0 (``59+78−6·13`` is ``59+(78−6·13)``, so it is ``59``), and
"a factor whose value is 1" every group of factors and divisors whose product is 1, *inside a product
that keeps something else* (``59·78/(6·13)`` is ``59``). A term is never reduced to nothing: a term
worth 1 that is *added* is not padding, so its factors stay as written, and two such terms built
differently stay different (``84+18/(2+16)`` and ``84+2/(18−16)`` are two solutions; ``80+5/5`` and
``80+1`` too). Exact pairs (``+a−a``, ``·a/a``) are dropped first, then the smallest group, then the
next, until none is left (in a product: none that leaves at least one factor).
One more rule in the spirit of the second: a sum used as a factor is stored with a positive value, its
sign moved to the enclosing term, so ``c−a·(b−d)`` and ``c+a·(d−b)`` are one solution. Distributivity
is *not* applied: ``(a+b)·c`` and ``a·c+b·c`` stay distinct.

A *solution* (:func:`check_solution`) uses at least two of the given numbers, each at most as often
as it is given, and its canonical form still holds at least two numbers: a bare number is never a
solution, even when it equals the target, and neither is a padded one (``59·(2−1)``, ``59+78−6·13``).

Representation: a canonical expression is a sorted tuple of signed terms ``(sign, factors)``; the
factors are a sorted tuple of ``(exponent, factor)`` with exponent ±1; a factor is ``("n", value)``
for a number or ``("+", terms, value)`` for a parenthesised sum of at least two terms (its value is
carried along so padding can be detected without re-evaluating). A sum that reduces to a single
term is spliced into its parent, so ``(77)`` and ``77`` agree. It is computed in two steps: the *flat
form* (:func:`flat_combine`; commutativity, associativity and signed terms only, a function of the
operands' flat forms, which lets the solver memoize on it), then :func:`reduce_form`, which drops
padding innermost first. Every way of writing one flattened expression thus gets one canonical form.

Limits: "same" is an equivalence, a canonical form is one representative, and padding can bridge two
honest solutions (``7−6/3+2−2`` pads both ``7−6/3`` and ``7−2``); then the padded expression gets
one of the two forms, chosen by the fixed order above, and never counts as a third solution. The
same holds inside a term worth 1 that could lose either of two cancelling groups (``5·7/(5·7)``): the
first in sorted order goes. A ``1`` made as a difference (``x+(3−2)`` is ``x+3−2``) and one made as a
ratio (``x+5/5``) differ, and both differ from ``x+1`` with a given ``1``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations
from typing import Any

MAX_EXPR_CHARS = 300  # longer inputs are rejected before tokenizing
MAX_DEPTH = 40  # deepest parenthesis nesting accepted

_DIGITS = "0123456789"
_OPERATORS = {
    "+": "+",
    "-": "-",
    "\u2212": "-",  # unicode minus
    "\u2013": "-",  # en dash
    "*": "*",
    "\u00d7": "*",  # ×
    "x": "*",
    "X": "*",
    "\u00b7": "*",  # middle dot
    "\u22c5": "*",  # dot operator
    "/": "/",
    "\u00f7": "/",  # ÷
}
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
ATOM_PRECEDENCE = 3

# A canonical expression, its terms and factors (see the module docstring). Nested tuples: hashable
# and totally ordered, so they sort and serve as dictionary keys.
Canonical = tuple[Any, ...]
Term = tuple[int, tuple[tuple[int, tuple[Any, ...]], ...]]


class ExprError(ValueError):
    """An expression that cannot be parsed or evaluated; the message says why."""


@dataclass(frozen=True)
class Num:
    value: int  # a non-negative integer literal


@dataclass(frozen=True)
class BinOp:
    op: str  # one of "+", "-", "*", "/"
    left: Expr
    right: Expr


Expr = Num | BinOp


# ---------------------------------------------------------------- parsing


def tokenize(text: str) -> list[int | str]:
    """Integers and the one-character tokens ``+ - * / ( )``; ExprError on anything else."""
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens: list[int | str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in _DIGITS:
            j = i
            while j < len(text) and text[j] in _DIGITS:
                j += 1
            tokens.append(int(text[i:j]))
            i = j
        elif ch in _OPERATORS:
            tokens.append(_OPERATORS[ch])
            i += 1
        elif ch in "()":
            tokens.append(ch)
            i += 1
        else:
            raise ExprError(f"unexpected character {ch!r} at position {i}")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := INT | '(' expr ')'."""

    def __init__(self, tokens: list[int | str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> int | str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self) -> Expr:
        node = self.term()
        while self.peek() in ("+", "-"):
            op = str(self.tokens[self.pos])
            self.pos += 1
            node = BinOp(op, node, self.term())
        return node

    def term(self) -> Expr:
        node = self.factor()
        while self.peek() in ("*", "/"):
            op = str(self.tokens[self.pos])
            self.pos += 1
            node = BinOp(op, node, self.factor())
        return node

    def factor(self) -> Expr:
        tok = self.peek()
        if isinstance(tok, int):
            self.pos += 1
            return Num(tok)
        if tok == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExprError(f"more than {MAX_DEPTH} nested parentheses")
            self.pos += 1
            node = self.expr()
            if self.peek() != ")":
                raise ExprError("missing ')'")
            self.pos += 1
            self.depth -= 1
            return node
        if tok is None:
            raise ExprError("expression ends where a number or '(' was expected")
        raise ExprError(f"expected a number or '(' but found {tok!r}")


def parse(text: str) -> Expr:
    """Parse one expression; ExprError says what is wrong."""
    tokens = tokenize(text)
    if not tokens:
        raise ExprError("empty expression")
    parser = _Parser(tokens)
    node = parser.expr()
    if parser.pos != len(tokens):
        raise ExprError(f"unexpected {tokens[parser.pos]!r} after a complete expression")
    return node


def evaluate(node: Expr) -> Fraction:
    """Exact value; ExprError on division by zero."""
    if isinstance(node, Num):
        return Fraction(node.value)
    left, right = evaluate(node.left), evaluate(node.right)
    if node.op == "+":
        return left + right
    if node.op == "-":
        return left - right
    if node.op == "*":
        return left * right
    if right == 0:
        raise ExprError("division by zero")
    return left / right


def leaves(node: Expr) -> list[int]:
    """The integer literals of the expression, left to right."""
    if isinstance(node, Num):
        return [node.value]
    return leaves(node.left) + leaves(node.right)


def uses_available(node: Expr, numbers: Iterable[int]) -> bool:
    """True when every literal is one of ``numbers``, each used at most as often as it is given."""
    used, available = Counter(leaves(node)), Counter(numbers)
    return all(available[value] >= count for value, count in used.items())


def to_text(node: Expr) -> str:
    """Compact text with the fewest parentheses, e.g. ``(6+77)*2``."""
    return _text_of(node)[0]


def _text_of(node: Expr) -> tuple[str, int]:
    if isinstance(node, Num):
        return str(node.value), ATOM_PRECEDENCE
    left, right = _text_of(node.left), _text_of(node.right)
    return join_text(node.op, left, right), PRECEDENCE[node.op]


def join_text(op: str, left: tuple[str, int], right: tuple[str, int]) -> str:
    """``left op right`` with parentheses only where precedence or non-associativity needs them."""
    prec = PRECEDENCE[op]
    left_text = f"({left[0]})" if left[1] < prec else left[0]
    needs = right[1] < prec or (right[1] == prec and op in "-/")
    right_text = f"({right[0]})" if needs else right[0]
    return f"{left_text}{op}{right_text}"


# ---------------------------------------------------------------- canonical form


def number_terms(value: int) -> Canonical:
    """The canonical form of a single number (0 is the empty sum)."""
    return reduce_form(number_form(value))


def factor_value(factor: tuple[Any, ...]) -> Fraction:
    return Fraction(factor[1]) if factor[0] == "n" else factor[2]


def _product_value(factors: Sequence[tuple[int, tuple[Any, ...]]]) -> Fraction:
    value = Fraction(1)
    for exponent, factor in factors:
        v = factor_value(factor)
        value = value * v if exponent == 1 else value / v
    return value


def terms_value(terms: Canonical) -> Fraction:
    """The exact value of a canonical expression."""
    return sum((sign * _product_value(factors) for sign, factors in terms), Fraction(0))


def _first_neutral_group(
    values: Sequence[Fraction], neutral: Fraction, add: bool, proper: bool = False
) -> tuple[int, ...]:
    """Indices of the smallest (then first) group whose sum (``add``) or product equals ``neutral``.

    () when there is none. ``proper``: only groups that leave at least one value out. Cheap exit when
    no group can exist: all values on one side of the neutral.
    """
    if neutral not in values and (all(v > neutral for v in values) or all(v < neutral for v in values)):
        return ()
    for size in range(1, len(values) + (0 if proper else 1)):
        for group in combinations(range(len(values)), size):
            total = neutral
            for i in group:
                total = total + values[i] if add else total * values[i]
            if total == neutral:
                return group
    return ()


def _drop_groups(
    items: list[Any], values: list[Fraction], neutral: Fraction, add: bool, keep_one: bool = False
) -> tuple[Any, ...]:
    """Sort; drop exactly cancelling pairs (``(1, x)`` with ``(-1, x)``), then neutral groups.

    Items are ``(sign or exponent, term or factor)``. Exact pairs go first so that a syntactic
    ``+a−a`` or ``·a/a`` is what gets cancelled when several choices would reach the neutral value.
    ``keep_one`` (products): drop only what leaves at least one item, so a product is never emptied:
    a term worth 1 keeps its factors (a lone sum of value 1 among them is spliced back by the caller).
    """
    order = sorted(range(len(items)), key=lambda i: items[i])
    items, values = [items[i] for i in order], [values[i] for i in order]

    def allowed(group: tuple[int, ...]) -> bool:
        return bool(group) and not (keep_one and len(group) == len(items))

    while allowed(pair := _first_exact_pair(items)):
        items = [x for i, x in enumerate(items) if i not in pair]
        values = [v for i, v in enumerate(values) if i not in pair]
    while allowed(group := _first_neutral_group(values, neutral, add, proper=keep_one)):
        items = [x for i, x in enumerate(items) if i not in group]
        values = [v for i, v in enumerate(values) if i not in group]
    return tuple(items)


def _first_exact_pair(items: list[Any]) -> tuple[int, ...]:
    """Indices of the first ``(1, x)``, ``(-1, x)`` pair; () when there is none."""
    negatives: dict[Any, int] = {}
    for i, (s, x) in enumerate(items):
        if s == -1:
            negatives.setdefault(x, i)
    for i, (s, x) in enumerate(items):
        if s == 1 and x in negatives:
            return (negatives[x], i)
    return ()


def _reduce_terms(terms: Sequence[Term]) -> Canonical:
    """Drop every group of terms that sums to 0 (a zero term, ``+a−a``, ``+2+3−5``); sorted."""
    values = [sign * _product_value(factors) for sign, factors in terms]
    return _drop_groups(list(terms), values, Fraction(0), add=True)


def _simplify_product(factors: Iterable[tuple[int, tuple[Any, ...]]]) -> tuple[Any, ...]:
    """Drop groups of factors and divisors whose product is 1 (``×1``, ``÷(5−4)``, ``·a/a``); sorted.

    Only groups that leave at least one factor go: a term worth 1 keeps the factors it is built from,
    so ``84+18/(2+16)``, ``84+2/(18−16)`` and ``84+1`` stay three different solutions, while
    ``84+18·(3−2)/(2+16)`` is ``84+18/(2+16)``. A factor of value 0 is kept (the term is then 0 and
    dropped by the caller).
    """
    items = list(factors)
    values = [factor_value(f) if e == 1 else 1 / factor_value(f) for e, f in items if factor_value(f) != 0]
    if len(values) < len(items):
        return tuple(sorted(items))
    return _drop_groups(items, values, Fraction(1), add=False, keep_one=True)


def _simplify_sum(terms: Iterable[Term]) -> Canonical:
    """Simplify each term, drop zero terms, splice lone sum factors, drop zero-sum groups, sort."""
    out: list[Term] = []
    for sign, raw_factors in terms:
        factors = _simplify_product(raw_factors)
        if _product_value(factors) == 0:
            continue
        if len(factors) == 1 and factors[0][0] == 1 and factors[0][1][0] == "+":
            out.extend((sign * s, f) for s, f in factors[0][1][1])
        else:
            out.append((sign, factors))
    return _reduce_terms(out)


def _negate(terms: Canonical) -> tuple[Term, ...]:
    return tuple((-sign, factors) for sign, factors in terms)


def _as_product(terms: Canonical) -> Term:
    """``(sign, factors)`` of an operand of × or ÷: a single term as is, a longer sum as one factor."""
    if len(terms) == 1:
        return terms[0]
    value = terms_value(terms)
    sign = 1
    if value < 0:
        sign, value, terms = -1, -value, tuple(sorted(_negate(terms)))
    return sign, ((1, ("+", terms, value)),)


def flat_combine(op: str, left: Canonical, right: Canonical) -> Canonical:
    """The *flat form* of ``left op right`` from the flat forms of its operands.

    The flat form applies only commutativity, associativity and the signed-term / inverse-factor
    rewriting (nothing is dropped), so it is the same for every way of writing one flattened
    expression; :func:`reduce_form` then drops padding. The caller must reject division by a right
    operand whose value is 0.
    """
    if op == "+":
        return tuple(sorted(left + right))
    if op == "-":
        return tuple(sorted(left + _negate(right)))
    left_sign, left_factors = _as_product(left)
    right_sign, right_factors = _as_product(right)
    if op == "/":
        right_factors = tuple((-e, f) for e, f in right_factors)
    elif op != "*":
        raise ValueError(f"unknown operator {op!r}")
    return ((left_sign * right_sign, tuple(sorted(left_factors + right_factors))),)


def number_form(value: int) -> Canonical:
    """The flat form of a single number."""
    return ((1, ((1, ("n", value)),)),)


def reduce_form(flat: Canonical) -> Canonical:
    """The canonical form of a flat form: padding dropped innermost first (see the module docstring)."""
    terms: list[Term] = []
    for sign, factors in flat:
        new_sign, new_factors = sign, []
        for exponent, factor in factors:
            if factor[0] == "n":
                new_factors.append((exponent, factor))
                continue
            inner = reduce_form(factor[1])
            if not inner:  # the sum is 0: so is the term (a divisor of 0 was rejected earlier)
                new_factors.append((exponent, ("+", (), Fraction(0))))
                continue
            inner_sign, inner_factors = _as_product(inner)
            new_sign *= inner_sign
            new_factors.extend((exponent * e, f) for e, f in inner_factors)
        terms.append((new_sign, tuple(new_factors)))
    return _simplify_sum(terms)


def canonical(node: Expr | str) -> Canonical:
    """The canonical form (hashable) of an expression or its text; ExprError if it cannot be evaluated.

    >>> canonical("6+77") == canonical("(6+77)*(2-1)") == canonical("6+77*(2-1)") == canonical("77+6+2-2")
    True
    >>> canonical("(3+4)*5") == canonical("3*5+4*5")
    False
    """
    if isinstance(node, str):
        node = parse(node)
    evaluate(node)  # raises on division by zero anywhere in the tree
    return reduce_form(flat_form(node))


def flat_form(node: Expr) -> Canonical:
    """Commutativity, associativity and signed terms / inverse factors only (see :func:`flat_combine`)."""
    if isinstance(node, Num):
        return number_form(node.value)
    return flat_combine(node.op, flat_form(node.left), flat_form(node.right))


def canonical_text(terms: Canonical) -> str:
    """A readable rendering of a canonical form, e.g. ``6+77`` or ``8*2/4-3`` (logs, score details)."""
    if not terms:
        return "0"
    ordered = [t for t in terms if t[0] == 1] + [t for t in terms if t[0] == -1]
    text = "".join(("+" if sign == 1 else "-") + _factors_text(factors) for sign, factors in ordered)
    return text[1:] if text.startswith("+") else text


def _factors_text(factors: tuple[Any, ...]) -> str:
    ordered = [f for f in factors if f[0] == 1] + [f for f in factors if f[0] == -1]
    parts = []
    for exponent, factor in ordered:
        inner = str(factor[1]) if factor[0] == "n" else f"({canonical_text(factor[1])})"
        parts.append(("*" if exponent == 1 else "/") + inner)
    text = "".join(parts)
    return text[1:] if text.startswith("*") else "1" + text


def distinct_solutions(exprs: Iterable[str], numbers: Sequence[int], target: int) -> dict[Canonical, str]:
    """The valid expressions among ``exprs``, one (the first seen) per canonical form.

    Valid: parses, evaluates exactly to ``target`` and uses only the given numbers, each at most as
    often as given. Invalid ones are skipped silently; use ``check_solution`` for the reason.
    """
    found: dict[Canonical, str] = {}
    for text in exprs:
        try:
            key = check_solution(text, numbers, target)
        except ExprError:
            continue
        found.setdefault(key, text)
    return found


def number_count(terms: Canonical) -> int:
    """How many number literals a canonical form holds (padding already dropped)."""
    count = 0
    for _, factors in terms:
        for _, factor in factors:
            count += 1 if factor[0] == "n" else number_count(factor[1])
    return count


def usage_error(node: Expr, numbers: Iterable[int]) -> str | None:
    """Why the literals of ``node`` are not a valid use of ``numbers`` (None when they are).

    Each given number may be used at most as often as it is given, and at least two numbers must be
    used: a bare number is not a solution.
    """
    used, available = Counter(leaves(node)), Counter(numbers)
    for value, count in used.items():
        if not available[value]:
            return f"uses {value}, which is not given"
        if count > available[value]:
            times = "once" if available[value] == 1 else f"{available[value]} times"
            return f"uses {value} {count} times but it is given {times}"
    if sum(used.values()) < 2:
        return "uses fewer than two of the given numbers (a bare number is not a solution)"
    return None


def check_solution(text: str, numbers: Sequence[int], target: int) -> Canonical:
    """The canonical form of a valid solution; ExprError saying why it is not one otherwise.

    Valid: parses, uses at least two of ``numbers`` (each at most as often as given), evaluates exactly
    to ``target``, and is more than padding around a single number (``59·(2−1)`` is the bare ``59``).
    """
    node = parse(text)
    value = evaluate(node)
    problem = usage_error(node, numbers)
    if problem:
        raise ExprError(problem)
    if value != target:
        raise ExprError(f"evaluates to {value}, not {target}")
    form = reduce_form(flat_form(node))
    if number_count(form) < 2:
        raise ExprError(f"is padding around the bare number {canonical_text(form)} (a bare number is not a solution)")
    return form
