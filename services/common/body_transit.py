"""Chat bodies on their way to the audit service, sealed by the service that produced them.

For a tenant whose policy keeps bodies ENCRYPTED, the audit service stores the
prompt and answer sealed under the end user's subject key. Between the chat and
that append, the body waits in the router's Redis outbox, for minutes if the
audit service is away. So the router seals it first: AES-256-GCM under a key
derived from ``ORCHESTRA_INTERNAL_KEY`` for this purpose alone (HKDF label
below), bound to the record's event id so it cannot be moved onto another
record. It travels as ``RecordBody.sealed_chat``, and the audit service opens
it just before sealing it under the subject's key. Redis never holds the
plaintext.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import DecodeError

from orchestra.audit.v1 import audit_service_pb2 as pb
from services.common.crypto import CredentialCipher, CredentialError

_LABEL = b"orchestra.audit.body-transit.v1"


class BodyTransitError(Exception):
    """A sealed body does not open: altered, for another record, or another internal key."""


class BodyTransit:
    """Seals chat bodies for the audit service and opens them there."""

    def __init__(self, internal_key: bytes) -> None:
        """Derives the transit key from the suite's internal key."""
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL).derive(
            internal_key
        )
        self._cipher = CredentialCipher(key)

    def seal(self, event_id: str, body: pb.ChatBody) -> bytes:
        """``body`` sealed for the record ``event_id``."""
        return self._cipher.seal_bytes(event_id, body.SerializeToString())

    def open(self, event_id: str, sealed: bytes) -> pb.ChatBody:
        """Opens what :meth:`seal` sealed for ``event_id``.

        Raises:
            BodyTransitError: It does not open, or is not a ChatBody.
        """
        try:
            return pb.ChatBody.FromString(self._cipher.open_bytes(event_id, sealed))
        except CredentialError:
            raise BodyTransitError(
                "sealed_chat does not open for this record (altered, sealed for another"
                " record, or under another ORCHESTRA_INTERNAL_KEY)"
            ) from None
        except DecodeError:
            raise BodyTransitError("sealed_chat does not hold a ChatBody") from None
