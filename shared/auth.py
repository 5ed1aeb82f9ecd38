"""API keys: their format, scopes, and the hash the store keeps. Pure functions, no I/O.

A key is ``atk_<id>_<secret>``: ``id`` is 12 hex characters (shown by ``asyncthink keys list`` and stored
on every episode the key submits), ``secret`` 32 random bytes, URL-safe base64. The store keeps the
SHA-256 of the whole key, never the key; a presented key is found by its id and compared by hash in
constant time (:func:`matches`). SHA-256 without a salt or stretching is enough here because the secret is
random and long (256 bits): there is no dictionary to try.

The bootstrap admin key (``ASYNCTHINK_ADMIN_KEY``) may be any string of at least 32 characters; it is
held as its hash too and answers as the key id :data:`BOOTSTRAP_ADMIN_ID`.

Scopes: ``submit`` (POST /v1/problems, chat completions), ``read`` (episodes, their events, models),
``admin`` (everything, every key's episodes, /metrics), ``human`` (the gateway's pages for people under
``/ui``: sign in, work the human queue in the key's pools, organize and plan episodes; it opens none of the
JSON API's routes).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from enum import StrEnum

KEY_PREFIX = "atk_"
BOOTSTRAP_ADMIN_ID = "admin"  # the key id of ASYNCTHINK_ADMIN_KEY (store ids are hex, so never this)
MAX_KEY_CHARS = 256  # longer presented keys are refused unread
_KEY = re.compile(r"^atk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class Scope(StrEnum):
    SUBMIT = "submit"
    READ = "read"
    ADMIN = "admin"
    HUMAN = "human"


SCOPES = tuple(s.value for s in Scope)


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """The scopes named (deduplicated, in the order of :class:`Scope`); ValueError for an unknown one."""
    out: set[Scope] = set()
    for value in values:
        try:
            out.add(Scope(value))
        except ValueError:
            raise ValueError(f"unknown scope {value!r}; scopes are: {', '.join(SCOPES)}") from None
    if not out:
        raise ValueError(f"a key needs at least one scope: {', '.join(SCOPES)}")
    return [s for s in Scope if s in out]


def generate_key() -> tuple[str, str]:
    """A new ``(key_id, key)``; the key is shown once and only its hash is stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The id inside a well-formed key, or None."""
    match = _KEY.match(key) if len(key) <= MAX_KEY_CHARS else None
    return match.group(1) if match else None


def hash_key(key: str) -> str:
    """The SHA-256 (hex) the store keeps for ``key``."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def matches(key: str, stored_hash: str) -> bool:
    """Whether ``key`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_key(key), stored_hash)
