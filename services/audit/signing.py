"""Ed25519 checkpoint signing and the canonical checkpoint note.

A checkpoint commits to the log's first ``tree_size`` records. What is signed
is this UTF-8 text, byte for byte (each line ends with ``\\n``)::

    orchestra.dev/audit
    <tree_size, decimal>
    <root hash, standard base64 with padding>
    <create_time in whole seconds since the Unix epoch, decimal>

The signing key comes from ``ORCHESTRA_AUDIT_SIGNING_KEY`` (base64 of the raw
32-byte Ed25519 private key) or ``ORCHESTRA_AUDIT_SIGNING_KEY_FILE`` (a file
holding that base64 text); without either it is derived from
``ORCHESTRA_INTERNAL_KEY`` with HKDF-SHA256 (a warning is logged: anyone with
the internal key could then sign). ``key_id`` is the hex of the first 16 bytes
of SHA-256 of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger(__name__)

ORIGIN = "orchestra.dev/audit"
KEY_ENV = "ORCHESTRA_AUDIT_SIGNING_KEY"
KEY_FILE_ENV = "ORCHESTRA_AUDIT_SIGNING_KEY_FILE"
_HKDF_INFO = b"orchestra.audit.checkpoint-signing-key.v1"


class SigningKeyError(ValueError):
    """A signing or public key is malformed; the message says which and why."""


def note(tree_size: int, root_hash: bytes, unix_time: int) -> bytes:
    """The canonical checkpoint text that is signed."""
    root = base64.b64encode(root_hash).decode()
    return f"{ORIGIN}\n{tree_size}\n{root}\n{unix_time}\n".encode()


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of a public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """Hex of the first 16 bytes of SHA-256 of the raw public key."""
    return hashlib.sha256(raw_public(key)).digest()[:16].hex()


@dataclasses.dataclass(frozen=True)
class Signer:
    """Signs checkpoints with one Ed25519 key.

    Attributes:
        private_key: The key.
        key_id: Its public key's fingerprint.
    """

    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def of(cls, private_key: Ed25519PrivateKey) -> Signer:
        """A signer for ``private_key``."""
        return cls(private_key, key_id(private_key.public_key()))

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public key verifiers need."""
        return self.private_key.public_key()

    def sign(self, tree_size: int, root_hash: bytes, unix_time: int) -> bytes:
        """The signature over :func:`note`."""
        return self.private_key.sign(note(tree_size, root_hash, unix_time))


def verify_note(
    public_key: Ed25519PublicKey, tree_size: int, root_hash: bytes, unix_time: int, signature: bytes
) -> bool:
    """Whether ``signature`` is ``public_key``'s over the checkpoint's note."""
    try:
        public_key.verify(signature, note(tree_size, root_hash, unix_time))
    except InvalidSignature:
        return False
    return True


def _decode_key(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise SigningKeyError(f"{what} is not base64") from None
    if len(raw) != 32:
        raise SigningKeyError(f"{what} must be 32 bytes of base64, got {len(raw)} bytes")
    return raw


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """A public key from base64 of its raw 32 bytes.

    Raises:
        SigningKeyError: It is not base64 of 32 bytes.
    """
    return Ed25519PublicKey.from_public_bytes(_decode_key(text, "the public key"))


def load_signer(env: Mapping[str, str] | None, internal_key: bytes) -> Signer:
    """The checkpoint signer configured by the environment (see the module docstring).

    Raises:
        SigningKeyError: The configured key is malformed or its file unreadable.
    """
    env = os.environ if env is None else env
    if env.get(KEY_ENV):
        raw = _decode_key(env[KEY_ENV], KEY_ENV)
    elif env.get(KEY_FILE_ENV):
        try:
            text = Path(env[KEY_FILE_ENV]).read_text()
        except OSError as exc:
            raise SigningKeyError(
                f"{KEY_FILE_ENV}: cannot read {env[KEY_FILE_ENV]}: {exc}"
            ) from None
        raw = _decode_key(text, KEY_FILE_ENV)
    else:
        raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
            internal_key
        )
        signer = Signer.of(Ed25519PrivateKey.from_private_bytes(raw))
        log.warning(
            "audit checkpoints are signed with a key derived from ORCHESTRA_INTERNAL_KEY"
            " (key_id %s); set %s or %s for a key of their own",
            signer.key_id,
            KEY_ENV,
            KEY_FILE_ENV,
        )
        return signer
    return Signer.of(Ed25519PrivateKey.from_private_bytes(raw))
