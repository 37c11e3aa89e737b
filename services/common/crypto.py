"""Secrets at rest (provider credentials, audit subject keys): AES-256-GCM under a derived key.

The data key is HKDF-SHA256 of ``ORCHESTRA_INTERNAL_KEY`` with a purpose label,
so the identity MAC key and this key never coincide. Each sealed value is
``version byte || 12-byte nonce || ciphertext+tag`` and is bound to its
provider id as associated data, so a ciphertext copied onto another provider's
row does not decrypt. The version byte leaves room for key rotation (a key id),
which comes later: today a changed internal key makes stored credentials
unreadable, and discovery reports that per provider instead of failing.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = 1
_NONCE_BYTES = 12
_SALT = b"orchestra.discovery"
_INFO = b"provider-credential/v1"


class CredentialError(Exception):
    """A stored credential cannot be decrypted (wrong key or tampered row)."""


class CredentialCipher:
    """Seals and opens provider credentials."""

    def __init__(self, internal_key: bytes) -> None:
        """Derives the data key.

        Args:
            internal_key: The suite's internal key (``Settings.internal_key``).
        """
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=_INFO).derive(
            internal_key
        )
        self._aead = AESGCM(key)

    def seal(self, provider_id: str, credential: str) -> bytes:
        """Encrypts ``credential`` for the provider ``provider_id``."""
        return self.seal_bytes(provider_id, credential.encode())

    def open(self, provider_id: str, sealed: bytes) -> str:
        """Decrypts a value :meth:`seal` produced for ``provider_id``.

        Raises:
            CredentialError: The value is malformed, or was sealed under another
                key or for another provider.
        """
        return self.open_bytes(provider_id, sealed).decode()

    def seal_bytes(self, bound_to: str, plaintext: bytes) -> bytes:
        """Encrypts ``plaintext``, bound to ``bound_to`` (associated data)."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, bound_to.encode())
        return bytes([_VERSION]) + nonce + sealed

    def open_bytes(self, bound_to: str, sealed: bytes) -> bytes:
        """Decrypts a value :meth:`seal_bytes` produced for ``bound_to``.

        Raises:
            CredentialError: The value is malformed, or was sealed under another
                key or bound to something else.
        """
        if len(sealed) < 1 + _NONCE_BYTES or sealed[0] != _VERSION:
            raise CredentialError("stored credential has an unknown format")
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, bound_to.encode())
        except InvalidTag:
            raise CredentialError(
                "stored credential does not decrypt (was ORCHESTRA_INTERNAL_KEY changed?)"
            ) from None


def credential_hint(credential: str) -> str:
    """A redacted hint that helps an operator recognise a key without revealing it.

    Long keys show their first 3 and last 4 characters ("sk-…a1b2"); shorter
    ones only their last 2, and very short ones nothing but the ellipsis, so
    the hint never carries most of a secret. Empty for no credential.
    """
    if not credential:
        return ""
    if len(credential) >= 16:
        return f"{credential[:3]}…{credential[-4:]}"
    if len(credential) >= 8:
        return f"…{credential[-2:]}"
    return "…"


def scrub(text: str, *secrets: str) -> str:
    """``text`` with every secret in it replaced by its hint.

    For messages that come from a provider: some echo the key they were sent
    ("Incorrect API key provided: sk-…"), and those messages are stored,
    answered and logged. Values shorter than 8 characters are left alone
    (they could not be told from ordinary words).
    """
    for secret in secrets:
        if len(secret) >= 8 and secret in text:
            text = text.replace(secret, credential_hint(secret))
    return text
