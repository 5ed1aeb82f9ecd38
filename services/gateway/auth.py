"""Who is calling: API keys, scopes and rate limits as FastAPI dependencies.

Routes declare what they need with the typed dependencies at the bottom (``SubmitKey``, ``ReadKey``,
``AdminKey``, ``AnyKey``); each resolves to the caller's :class:`Principal`. A key is sent as
``Authorization: Bearer <key>`` (what the ``openai`` client does) or ``X-API-Key: <key>``. In order:

* **401** (with ``WWW-Authenticate: Bearer``): no key, a malformed, unknown or revoked key;
* **403**: a valid key without the scope the route needs (``admin`` has every scope);
* **429** (with ``Retry-After``): the key's token bucket is empty (:mod:`services.gateway.ratelimit`).

Keys are checked by :class:`KeyVerifier`: the bootstrap admin key by hash, any other by the id inside it
(one indexed read, in a worker thread) and then its hash, compared in constant time. A verified key is
trusted for ``auth_cache_s`` seconds (a revocation takes that long to apply); failures are never cached.

When keys are not required (``Settings.requires_keys``), every caller is the anonymous
:data:`OPEN_ACCESS` principal, which sees everything, but only on loopback: a request that reaches
the gateway on another address is refused (403), whatever the bind address was.

Ownership: an episode belongs to the key that submitted it. :meth:`Principal.may_see` is false for
another key's episode, and routes answer that with the same 404 as a missing one; admins see all.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from services.gateway.deps import StateDep
from shared.auth import BOOTSTRAP_ADMIN_ID, MAX_KEY_CHARS, Scope, hash_key, key_id_of, matches
from shared.config import is_loopback

CACHE_MAX_KEYS = 4096


@dataclass(frozen=True)
class Principal:
    """A verified caller."""

    key_id: str | None  # the ApiKey id, BOOTSTRAP_ADMIN_ID, or None for open access
    name: str
    scopes: frozenset[Scope]
    rate_limit_per_minute: int  # 0: no limit

    def has(self, scope: Scope) -> bool:
        return Scope.ADMIN in self.scopes or scope in self.scopes

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    @property
    def owner_filter(self) -> str | None:
        """The ``api_key_id`` a listing is restricted to; None for admins (everything)."""
        return None if self.is_admin else self.key_id or ""

    def may_see(self, owner: str | None) -> bool:
        return self.is_admin or (self.key_id is not None and owner == self.key_id)


OPEN_ACCESS = Principal(key_id=None, name="open access (loopback, no keys)", scopes=frozenset(Scope), rate_limit_per_minute=0)


class KeyVerifier:
    """Checks presented keys against the bootstrap admin key and the ``api_keys`` table."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        admin_key: str | None,
        default_rate_limit: int,
        cache_s: float,
    ) -> None:
        self.session_factory = session_factory
        self.admin_hash = hash_key(admin_key) if admin_key else None
        self.default_rate_limit = default_rate_limit
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, Principal]] = {}  # hash of a key -> (expiry, principal)

    async def verify(self, key: str) -> Principal | None:
        """The principal of ``key``, or None when it is not a live key."""
        if not key or len(key) > MAX_KEY_CHARS:
            return None
        if self.admin_hash is not None and matches(key, self.admin_hash):
            return Principal(BOOTSTRAP_ADMIN_ID, "bootstrap admin key", frozenset({Scope.ADMIN}), self.default_rate_limit)
        key_id = key_id_of(key)
        if key_id is None:
            return None
        digest = hash_key(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        principal = await asyncio.to_thread(self._lookup, key_id, key)
        if principal is not None and self.cache_s > 0:
            if len(self._cache) >= CACHE_MAX_KEYS:
                self._cache.clear()
            self._cache[digest] = (now + self.cache_s, principal)
        return principal

    def _lookup(self, key_id: str, key: str) -> Principal | None:
        from shared.store import repository

        with self.session_factory() as session:
            row = repository.get_api_key(session, key_id=key_id)
            if row is None or row.revoked_at is not None or not matches(key, row.key_hash):
                return None
            scopes = frozenset(Scope(s) for s in row.scopes if s in Scope._value2member_map_)
            limit = row.rate_limit_per_minute
            return Principal(row.id, row.name, scopes, self.default_rate_limit if limit is None else limit)


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer atk_…`.")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key, as a header.")


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})


async def authenticate(
    request: Request,
    state: StateDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_api_key_header)],
) -> Principal:
    """The caller's principal; 401 when keys are required and none valid was sent."""
    if state.verifier is None:
        server = request.scope.get("server")
        if server and not _loopback_or_name(str(server[0])):
            raise HTTPException(
                403,
                detail="this gateway runs without API keys and answers only on loopback; "
                "require keys (ASYNCTHINK_AUTH=keys) to serve other addresses",
            )
        return OPEN_ACCESS
    key = bearer.credentials if bearer is not None else header_key
    if not key:
        raise _unauthorized("an API key is required: send Authorization: Bearer <key> (or X-API-Key: <key>)")
    principal = await state.verifier.verify(key.strip())
    if principal is None:
        raise _unauthorized("invalid or revoked API key")
    return principal


def _loopback_or_name(host: str) -> bool:
    """True for a loopback address, and for a name that is not an IP address (an in-process client)."""
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True
    return is_loopback(host)


@functools.cache
def requires(*scopes: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller, who must hold one of ``scopes`` (any valid key when none are named),
    within the key's rate limit."""
    needed = " or ".join(s.value for s in scopes)

    async def dependency(principal: Annotated[Principal, Depends(authenticate)], state: StateDep) -> Principal:
        if scopes and not any(principal.has(s) for s in scopes):
            raise HTTPException(403, detail=f"this API key lacks the {needed} scope this route needs")
        if principal.rate_limit_per_minute > 0 and principal.key_id is not None:
            wait = await state.rate_limiter.acquire(principal.key_id, per_minute=principal.rate_limit_per_minute)
            if wait > 0:
                raise HTTPException(
                    429,
                    detail=f"rate limit of {principal.rate_limit_per_minute} requests a minute reached for "
                    f"this API key; retry in {math.ceil(wait)} s",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        return principal

    return dependency


SubmitKey = Annotated[Principal, Depends(requires(Scope.SUBMIT))]
ReadKey = Annotated[Principal, Depends(requires(Scope.READ))]
AdminKey = Annotated[Principal, Depends(requires(Scope.ADMIN))]
ModelsKey = Annotated[Principal, Depends(requires(Scope.SUBMIT, Scope.READ))]  # who can use the models
AnyKey = Annotated[Principal, Depends(requires())]  # any valid key (the API's documentation)
