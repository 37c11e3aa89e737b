"""API key secrets: their format, generation and hashing.

A secret looks like ``ok_<key_id>_<random>``: the key id (which never contains
``_``) lets the service find the key's row by primary key, and the random part
(32 URL-safe characters, 192 bits) is what makes it secret. Only the SHA-256 of
the whole secret is stored; a presented secret is hashed and compared in
constant time.
"""

from __future__ import annotations

import hmac
import re
import secrets

from services.common import keycache

PREFIX = "ok_"
_RANDOM_BYTES = 24  # 32 URL-safe base64 characters
_KEY_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_key_id() -> str:
    """A fresh, random key id: 12 lowercase letters and digits."""
    return "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(12))


def valid_key_id(key_id: str) -> bool:
    """Whether ``key_id`` has the form ids take: ``[a-z0-9][a-z0-9-]{0,62}``."""
    return bool(_KEY_ID.fullmatch(key_id))


def new_secret(key_id: str) -> str:
    """A fresh secret for ``key_id``: ``ok_<key_id>_<32 random URL-safe chars>``."""
    return f"{PREFIX}{key_id}_{secrets.token_urlsafe(_RANDOM_BYTES)}"


def key_id_of(secret: str) -> str | None:
    """The key id a secret names, or None if it is not of the ``ok_`` form."""
    if not secret.startswith(PREFIX):
        return None
    key_id, sep, rest = secret[len(PREFIX) :].partition("_")
    if not sep or not rest or not valid_key_id(key_id):
        return None
    return key_id


digest = keycache.digest
"""SHA-256 of the secret: what is stored and what caches are keyed by."""


def matches(secret_digest: bytes, stored_digest: bytes) -> bool:
    """Constant-time comparison of a presented secret's digest with the stored one."""
    return hmac.compare_digest(secret_digest, stored_digest)
