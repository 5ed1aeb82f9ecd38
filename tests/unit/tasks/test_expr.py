"""Countdown expressions (shared/tasks/expr.py) at their edges: the parser's limits and messages, the text
forms, the flat form's signs, padding that sums to 0 as a group, and the messages a solution check gives.

The rules themselves (what is one solution) are tested in test_countdown.py.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from shared.tasks.expr import (
    ExprError,
    canonical,
    canonical_text,
    check_solution,
    distinct_solutions,
    evaluate,
    flat_combine,
    flat_form,
    number_count,
    number_form,
    number_terms,
    parse,
    to_text,
    tokenize,
    uses_available,
)


def error_of(text: str) -> str:
    with pytest.raises(ExprError) as err:
        evaluate(parse(text))
    return str(err.value)


# ---------------------------------------------------------------- parser limits and messages


def test_300_characters_is_the_longest_expression() -> None:
    longest = "1+" * 149 + "11"  # 149 * 2 + 2 = 300 characters
    assert len(longest) == 300 and evaluate(parse(longest)) == 149 + 11
    assert error_of(longest + "1") == "expression longer than 300 characters"


def test_40_nested_parentheses_is_the_deepest() -> None:
    assert evaluate(parse("(" * 40 + "1" + ")" * 40)) == 1
    assert error_of("(" * 41 + "1" + ")" * 41) == "more than 40 nested parentheses"
    # depth is nesting, not a count of groups: 41 groups side by side are fine ...
    assert evaluate(parse("+".join(["(1)"] * 41))) == 41
    # ... and closing a group gives its level back exactly: a 40-deep group after a 2-deep one passes,
    # a 41-deep group after a 1-deep one does not
    assert evaluate(parse("((1))+" + "(" * 40 + "1" + ")" * 40)) == 2
    assert error_of("(1)+" + "(" * 41 + "1" + ")" * 41) == "more than 40 nested parentheses"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("3+a", "unexpected character 'a' at position 2"),
        ("2**3", "expected a number or '(' but found '*'"),
        ("3+", "expression ends where a number or '(' was expected"),
        ("(3+4", "missing ')'"),
        ("3+4)", "unexpected ')' after a complete expression"),
        ("3 4", "unexpected 4 after a complete expression"),
        ("1/(2-2)", "division by zero"),
    ],
)
def test_parser_messages(text: str, message: str) -> None:
    assert error_of(text) == message


def test_tokens() -> None:
    assert tokenize("12 × (3−4) ÷ 5x6") == [12, "*", "(", 3, "-", 4, ")", "/", 5, "*", 6]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("2*3*4", "2*3*4"),  # left operand of equal precedence: no parentheses
        ("2-3-4", "2-3-4"),
        ("2+(3+4)", "2+3+4"),  # + and * are associative: a right operand of equal precedence needs none
        ("2*(3*4)", "2*3*4"),
        ("2-(3-4)", "2-(3-4)"),  # - and / are not: it keeps them
        ("2/(3/4)", "2/(3/4)"),
        ("(2+3)*4", "(2+3)*4"),
        ("2*(3+4)", "2*(3+4)"),
    ],
)
def test_to_text_uses_the_fewest_parentheses(text: str, shown: str) -> None:
    assert to_text(parse(text)) == shown


# ---------------------------------------------------------------- flat form and canonical form


def test_flat_form_of_a_sum_used_as_a_factor() -> None:
    # a sum factor carries its value and is stored positive, its sign moved to the term:
    # 3*(1-2) = -(2-1)*3, the factor (2-1) worth 1
    two_minus_one = ((-1, ((1, ("n", 1)),)), (1, ((1, ("n", 2)),)))
    assert flat_form(parse("3*(1-2)")) == ((-1, ((1, ("+", two_minus_one, Fraction(1))), (1, ("n", 3)))),)
    # a positive sum keeps its sign, even one worth less than 1: 4*(1/2-1/4), the factor worth 1/4
    quarter = ((-1, ((-1, ("n", 4)), (1, ("n", 1)))), (1, ((-1, ("n", 2)), (1, ("n", 1)))))
    assert flat_form(parse("4*(1/2-1/4)")) == ((1, ((1, ("+", quarter, Fraction(1, 4))), (1, ("n", 4)))),)
    # so does a sum worth 0 (the term is 0 and is dropped later)
    zero = ((-1, ((1, ("n", 3)),)), (1, ((1, ("n", 3)),)))
    assert flat_form(parse("5*(3-3)")) == ((1, ((1, ("+", zero, Fraction(0))), (1, ("n", 5)))),)


def test_flat_combine_refuses_an_unknown_operator() -> None:
    with pytest.raises(ValueError) as err:
        flat_combine("^", number_form(2), number_form(3))
    assert str(err.value) == "unknown operator '^'"


def test_a_group_of_terms_summing_to_0_is_dropped_even_when_it_is_the_whole_sum() -> None:
    assert canonical("2+3-5") == ()  # the three terms together are 0
    assert canonical("2/4-1/4-1/4") == ()  # 1/2 - 1/4 - 1/4: every term below 1, together 0
    assert canonical("7+2/4-1/4-1/4") == canonical("7")
    assert canonical("5+0*7") == canonical("5") == ((1, ((1, ("n", 5)),)),)  # a zero term is dropped
    assert number_terms(5) == canonical("5") and number_terms(0) == ()


@pytest.mark.parametrize(
    ("text", "shown", "numbers"),
    [
        ("8*2/4-3", "2*8/4-3", 4),  # terms with + first, factors with * first, each in sorted order
        ("10-3", "10-3", 2),
        ("0-5", "-5", 1),  # a leading minus stays
        ("3*(2-5)", "-(5-2)*3", 3),  # the sum factor is stored positive, its sign on the term
        ("(3-2)/4", "1/4", 1),  # (3-2) is a factor worth 1: padding; a term of divisors only reads 1/...
        ("7+5/(9-4)", "5/(9-4)+7", 4),
        ("2-2", "0", 0),  # nothing left
    ],
)
def test_canonical_text_and_number_count(text: str, shown: str, numbers: int) -> None:
    form = canonical(text)
    assert canonical_text(form) == shown
    assert number_count(form) == numbers


# ---------------------------------------------------------------- solutions


def test_solution_messages() -> None:
    with pytest.raises(ExprError) as err:
        check_solution("7+7+7", [7, 7, 1], 21)
    assert str(err.value) == "uses 7 3 times but it is given 2 times"
    with pytest.raises(ExprError) as err:
        check_solution("25", [3, 7, 25, 50], 25)
    assert str(err.value) == "uses fewer than two of the given numbers (a bare number is not a solution)"
    with pytest.raises(ExprError) as err:
        check_solution("25+7-7", [7, 7, 25], 25)
    assert str(err.value) == "is padding around the bare number 25 (a bare number is not a solution)"


def test_uses_available() -> None:
    assert uses_available(parse("25+25"), [25, 25, 3])  # used exactly as often as given
    assert not uses_available(parse("25+25"), [25, 3])
    assert not uses_available(parse("4+3"), [3, 5])


def test_distinct_solutions_skips_an_invalid_one_and_goes_on() -> None:
    found = distinct_solutions(["50+7", "50+25", "3*25"], [3, 7, 25, 50], 75)
    assert list(found.values()) == ["50+25", "3*25"]
