"""Session cookies and CSRF tokens of the pages for people."""

from __future__ import annotations

import time

import pytest

from services.gateway.human.session import Person, Signer, csrf_ok, login_token, new_person


def test_signed_payloads_round_trip_and_refuse_tampering_expiry_and_other_purposes() -> None:
    signer = Signer(b"k" * 32)
    token = signer.sign("session", {"a": 1, "exp": time.time() + 60})
    assert signer.load("session", token) == {"a": 1, "exp": pytest.approx(time.time() + 60, abs=5)}
    assert signer.load("login", token) is None  # signed for another purpose
    payload, mac = token.split(".")
    assert signer.load("session", payload + "." + mac[:-2] + "xx") is None
    assert signer.load("session", "eyJhIjoyfQ." + mac) is None  # another payload under the same mac
    assert Signer(b"o" * 32).load("session", token) is None
    assert signer.load("session", signer.sign("session", {"exp": time.time() - 1})) is None
    for junk in (None, "", "no-dot", "a.b.c", "!!.??", "x" * 5000):
        assert signer.load("session", junk) is None
    with pytest.raises(ValueError):
        Signer(b"short")


def test_a_person_in_a_cookie() -> None:
    person = new_person("abc", "Ann", admin=False, pools=["experts"])
    again = Person.from_json(person.to_json())
    assert again == person and again.sees_pool("experts") and not again.sees_pool("default")
    assert new_person("x", "Y", admin=True, pools=None).sees_pool("anything")
    assert Person.from_json({"k": "x"}) is None


def test_csrf() -> None:
    assert csrf_ok("abc", "abc") and not csrf_ok("abc", "abd") and not csrf_ok("abc", None) and not csrf_ok("abc", "")
    token, cookie = login_token(Signer(b"k" * 32))
    assert Signer(b"k" * 32).load("login", cookie)["t"] == token  # type: ignore[index]
