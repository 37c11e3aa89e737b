"""Chat bodies sealed under per-subject keys (crypto only; storage is in body_store.py).

A subject is a tenant plus an end user. Each subject has one random 256-bit
key; its bodies are sealed with AES-256-GCM and bound (as associated data) to
their record's event id, tenant and end user, so a ciphertext moved onto
another record does not open. The key is stored wrapped by a master key
derived from ``ORCHESTRA_INTERNAL_KEY`` with the same sealing discovery uses
for provider credentials (:class:`services.common.crypto.CredentialCipher`,
keyed here from an audit-specific HKDF label so the two never share a key).

Sealing is deterministic for a given key, record and plaintext: the nonce is an
HMAC of those (a synthetic IV). A producer retrying an append therefore sends
the same leaf, and the idempotent repeat matches the original byte for byte;
two different plaintexts never share a nonce under one key.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import os
import uuid

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.common.crypto import CredentialCipher, CredentialError

_VERSION = 1
_NONCE_BYTES = 12
_KEY_BYTES = 32
_MASTER_INFO = b"orchestra.audit.subject-key-wrap.v1"
_AAD_PREFIX = b"orchestra.audit.body/v1\x00"


class BodyError(Exception):
    """A sealed body or wrapped key does not open (altered, or another master key)."""


@dataclasses.dataclass(frozen=True)
class SubjectKey:
    """A subject's data key.

    Attributes:
        key_id: Its id (recorded in each record it seals, ``body_key_id``).
        raw: The 32 key bytes.
    """

    key_id: str
    raw: bytes


@dataclasses.dataclass(frozen=True)
class SealedBody:
    """A body ready to be stored beside its record.

    Attributes:
        event_id: The record's event id.
        tenant_id: The subject's tenant.
        end_user: The subject's end user.
        key_id: The key that sealed it.
        sealed: version || nonce || ciphertext and tag.
        expire_time: When retention drops it (None: never).
    """

    event_id: str
    tenant_id: str
    end_user: str
    key_id: str
    sealed: bytes
    expire_time: datetime.datetime | None

    @property
    def sha256(self) -> bytes:
        """What the record's leaf commits to (``ChatEvent.body_sha256``)."""
        return hashlib.sha256(self.sealed).digest()


class KeyWrapper:
    """Wraps and unwraps subject keys under the master key."""

    def __init__(self, internal_key: bytes) -> None:
        """Derives the audit master key from the suite's internal key."""
        master = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MASTER_INFO).derive(
            internal_key
        )
        self._cipher = CredentialCipher(master)

    @staticmethod
    def _label(key_id: str, tenant_id: str, end_user: str) -> str:
        # Bound as associated data: a wrapped key copied to another row fails.
        return f"audit-subject-key\x00{key_id}\x00{tenant_id}\x00{end_user}"

    def new_key(self, tenant_id: str, end_user: str) -> tuple[SubjectKey, bytes]:
        """A fresh key for a subject and its wrapped form (for the key table)."""
        key = SubjectKey(uuid.uuid4().hex, os.urandom(_KEY_BYTES))
        wrapped = self._cipher.seal(
            self._label(key.key_id, tenant_id, end_user), base64.b64encode(key.raw).decode()
        )
        return key, wrapped

    def unwrap(self, key_id: str, tenant_id: str, end_user: str, wrapped: bytes) -> SubjectKey:
        """The key a :meth:`new_key` wrapped.

        Raises:
            BodyError: The row was altered or the internal key changed.
        """
        try:
            text = self._cipher.open(self._label(key_id, tenant_id, end_user), wrapped)
            return SubjectKey(key_id, base64.b64decode(text, validate=True))
        except (CredentialError, binascii.Error) as exc:
            raise BodyError(f"subject key {key_id} does not unwrap: {exc}") from None


def _aad(event_id: str, tenant_id: str, end_user: str) -> bytes:
    return _AAD_PREFIX + "\x00".join((event_id, tenant_id, end_user)).encode()


def seal(
    key: SubjectKey,
    event_id: str,
    tenant_id: str,
    end_user: str,
    plaintext: bytes,
    expire_time: datetime.datetime | None,
) -> SealedBody:
    """Seals one record's body under its subject's key (deterministically)."""
    aad = _aad(event_id, tenant_id, end_user)
    nonce = hmac.new(key.raw, b"nonce\x00" + aad + b"\x00" + plaintext, hashlib.sha256).digest()[
        :_NONCE_BYTES
    ]
    sealed = bytes([_VERSION]) + nonce + AESGCM(key.raw).encrypt(nonce, plaintext, aad)
    return SealedBody(event_id, tenant_id, end_user, key.key_id, sealed, expire_time)


def open_body(
    key: SubjectKey, event_id: str, tenant_id: str, end_user: str, sealed: bytes
) -> bytes:
    """The plaintext :func:`seal` sealed.

    Raises:
        BodyError: Malformed, altered, or sealed for another record or key.
    """
    if len(sealed) < 1 + _NONCE_BYTES or sealed[0] != _VERSION:
        raise BodyError("stored body has an unknown format")
    nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
    try:
        return AESGCM(key.raw).decrypt(nonce, body, _aad(event_id, tenant_id, end_user))
    except InvalidTag:
        raise BodyError("stored body does not decrypt under its subject key") from None
