"""Signed session cookies and CSRF tokens for the pages for people.

A person signs in with an API key of scope ``human`` (or ``admin``); the gateway answers with a session
cookie (``atk_session``): the person's key id, name, pools, a CSRF token and an expiry, as JSON, signed
with HMAC-SHA256 under ``ASYNCTHINK_SECRET_KEY`` (:class:`Signer`). The key itself is never in the cookie.
The cookie is ``HttpOnly``, ``SameSite=Lax``, ``Path=/ui`` and ``Secure`` when the page came over HTTPS.
Each request re-checks that the key is still live (:class:`~services.gateway.human.state.KeyLiveness`),
so revoking the key ends its sessions within ``ASYNCTHINK_AUTH_CACHE_S``.

CSRF: every state-changing request (``POST``) carries the session's token, in the ``X-CSRF-Token`` header
(pages' fetch calls) or a ``csrf`` form field (forms, and the beacon a closing page sends); it is compared
in constant time. Before sign-in, the login form is protected the same way by a short-lived signed
``atk_login`` cookie holding its own token (double submit). Pure functions plus small dataclasses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

SESSION_COOKIE = "atk_session"
LOGIN_COOKIE = "atk_login"
COOKIE_PATH = "/ui"
SESSION_S = 12 * 3600  # a session lasts this long after sign-in
LOGIN_S = 30 * 60  # a login form is good this long


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and checks small JSON payloads (``<payload>.<mac>``, both URL-safe base64)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the session secret must be at least 32 bytes")
        self._secret = secret

    def _mac(self, purpose: str, payload: str) -> str:
        return _b64(hmac.new(self._secret, f"{purpose}.{payload}".encode(), hashlib.sha256).digest())

    def sign(self, purpose: str, data: dict[str, Any]) -> str:
        payload = _b64(json.dumps(data, separators=(",", ":"), sort_keys=True).encode())
        return f"{payload}.{self._mac(purpose, payload)}"

    def load(self, purpose: str, token: str | None, *, now: float | None = None) -> dict[str, Any] | None:
        """The payload of a token signed for ``purpose`` and not expired (field ``exp``); None otherwise."""
        if not token or len(token) > 4096 or token.count(".") != 1:
            return None
        payload, mac = token.split(".")
        if not hmac.compare_digest(mac, self._mac(purpose, payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
        except ValueError:
            return None
        if not isinstance(data, dict) or float(data.get("exp", 0)) < (now if now is not None else time.time()):
            return None
        return data


@dataclass(frozen=True)
class Person:
    """A signed-in person, as their session cookie says."""

    key_id: str  # the ApiKey id ("admin" for the bootstrap key)
    name: str
    admin: bool
    pools: tuple[str, ...] | None  # the pools they work in; None: every pool
    csrf: str
    expires: float

    def sees_pool(self, pool: str) -> bool:
        return self.pools is None or pool in self.pools

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.key_id, "n": self.name, "a": self.admin,
            "p": list(self.pools) if self.pools is not None else None, "c": self.csrf, "exp": self.expires,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Person | None:
        try:
            pools = data.get("p")
            return Person(
                key_id=str(data["k"]), name=str(data["n"]), admin=bool(data.get("a")),
                pools=tuple(str(p) for p in pools) if isinstance(pools, list) else None,
                csrf=str(data["c"]), expires=float(data["exp"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


def new_person(key_id: str, name: str, *, admin: bool, pools: list[str] | None, now: float | None = None) -> Person:
    now = now if now is not None else time.time()
    return Person(key_id, name, admin, tuple(pools) if pools is not None else None, secrets.token_urlsafe(24), now + SESSION_S)


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


def login_token(signer: Signer, *, now: float | None = None) -> tuple[str, str]:
    """A new login form token and the signed cookie that holds it."""
    token = secrets.token_urlsafe(24)
    now = now if now is not None else time.time()
    return token, signer.sign("login", {"t": token, "exp": now + LOGIN_S})
