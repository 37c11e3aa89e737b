"""Audit records as the log stores them: validated, canonical, hashed.

A record's canonical form is its deterministic protobuf serialisation with the
service-assigned fields (``index``, ``leaf_hash``) cleared. The log stores those
exact bytes, so verification never depends on re-serialising (which protobuf
does not promise to be stable across versions) and a record reads back exactly
as it was appended. The filterable fields are copied out into :class:`Entry`.
"""

from __future__ import annotations

import dataclasses
import datetime

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from orchestra.audit.v1 import audit_service_pb2
from orchestra.common.v1 import errors_pb2
from services.audit import hashing
from services.audit.bodies import SealedBody
from services.common.errors import InvalidArgument

MAX_EVENT_ID_CHARS = 128
MAX_ID_CHARS = 512  # tenant, actor, model and end-user ids
MAX_REASON_CHARS = 4096

AuditRecord = audit_service_pb2.AuditRecord

# Which oneof member each kind's body must be.
_BODY_OF_KIND: dict[int, str] = {
    audit_service_pb2.RECORD_KIND_CHAT: "chat",
    audit_service_pb2.RECORD_KIND_ADMIN: "admin",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """A record ready to be appended: its canonical bytes and filterable fields.

    Attributes:
        event_id: The producer's idempotency key.
        tenant_id: The tenant the record belongs to.
        event_time: When the event happened (UTC; PostgreSQL keeps microseconds).
        kind: The ``RecordKind`` value.
        actor: The API key id or service name.
        model: The chat's model ("" for admin records).
        end_user: The chat's end user ("" when none).
        canonical: The canonical record bytes.
        leaf_hash: ``hashing.leaf_hash(canonical)``.
        body: The sealed chat body stored beside the record (its
            ``body_sha256`` is in ``canonical``), or None.
    """

    event_id: str
    tenant_id: str
    event_time: datetime.datetime
    kind: int
    actor: str
    model: str
    end_user: str
    canonical: bytes
    leaf_hash: bytes
    body: SealedBody | None = None


def _invalid(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(errors_pb2.ERROR_REASON_INVALID_FIELD, message, field=field)


def to_datetime(timestamp: timestamp_pb2.Timestamp, field: str) -> datetime.datetime:
    """A protobuf Timestamp as an aware UTC datetime.

    Raises:
        InvalidArgument: INVALID_FIELD naming ``field`` if it is out of range.
    """
    try:
        return timestamp.ToDatetime(tzinfo=datetime.UTC)
    except (ValueError, OverflowError) as exc:
        raise _invalid(field, f"{field} is not a valid timestamp: {exc}") from None


def validate(record: AuditRecord, field: str) -> None:
    """Checks that ``record`` may be appended.

    Args:
        record: The record as the producer sent it.
        field: Its path in the request ("record", "records[3]"), for errors.

    Raises:
        InvalidArgument: INVALID_FIELD; ``metadata["field"]`` names the field.
    """
    _check_columns(record, field)
    if not record.event_id:
        raise _invalid(f"{field}.event_id", "event_id is required")
    if len(record.event_id) > MAX_EVENT_ID_CHARS:
        raise _invalid(
            f"{field}.event_id", f"event_id must be at most {MAX_EVENT_ID_CHARS} characters"
        )
    if not record.tenant_id:
        raise _invalid(f"{field}.tenant_id", "tenant_id is required")
    if not record.HasField("event_time"):
        raise _invalid(f"{field}.event_time", "event_time is required")
    to_datetime(record.event_time, f"{field}.event_time")
    body = _BODY_OF_KIND.get(record.kind)
    if body is None:
        raise _invalid(f"{field}.kind", "kind must be RECORD_KIND_CHAT or RECORD_KIND_ADMIN")
    if record.WhichOneof("body") != body:
        raise _invalid(
            f"{field}.{body}", f"a record of kind {_kind_name(record.kind)} needs {body}"
        )


def check_text(value: str, field: str, max_chars: int = MAX_ID_CHARS) -> None:
    """Refuses a string PostgreSQL cannot store in a text column (it holds a NUL),
    or one longer than ``max_chars`` (ids are indexed: an index entry holds at
    most about 2.7 kB).

    Raises:
        InvalidArgument: INVALID_FIELD naming ``field``.
    """
    if "\x00" in value:
        raise _invalid(field, f"{field} must not contain NUL characters")
    if len(value) > max_chars:
        raise _invalid(field, f"{field} is longer than {max_chars} characters")


def _check_columns(record: AuditRecord, field: str) -> None:
    """Checks the strings copied into columns (the record bytes take anything)."""
    check_text(record.event_id, f"{field}.event_id")
    check_text(record.tenant_id, f"{field}.tenant_id")
    check_text(record.actor, f"{field}.actor")
    check_text(record.chat.model, f"{field}.chat.model")
    check_text(record.chat.attribution.end_user, f"{field}.chat.attribution.end_user")


def _kind_name(kind: int) -> str:
    return audit_service_pb2.RecordKind.Name(kind)  # type: ignore[arg-type]


def canonical_bytes(record: AuditRecord) -> bytes:
    """The canonical bytes of ``record``: deterministic, without index and leaf hash."""
    canonical = AuditRecord()
    canonical.CopyFrom(record)
    canonical.ClearField("index")
    canonical.ClearField("leaf_hash")
    return canonical.SerializeToString(deterministic=True)


def entry_of(record: AuditRecord, field: str = "record", body: SealedBody | None = None) -> Entry:
    """Validates ``record`` and prepares it for the log.

    The service owns ``chat.body_sha256`` and ``chat.body_key_id``: whatever
    the producer put there is replaced by the commitment to ``body`` (or
    cleared when there is none), so a record never claims a body it lacks.

    Raises:
        InvalidArgument: As :func:`validate`.
    """
    validate(record, field)
    if record.kind == audit_service_pb2.RECORD_KIND_CHAT and (
        body is not None or record.chat.body_sha256 or record.chat.body_key_id
    ):
        committed = AuditRecord()
        committed.CopyFrom(record)
        committed.chat.body_sha256 = body.sha256 if body is not None else b""
        committed.chat.body_key_id = body.key_id if body is not None else ""
        record = committed
    canonical = canonical_bytes(record)
    entry = _entry(record, canonical)
    return entry if body is None else dataclasses.replace(entry, body=body)


def _entry(record: AuditRecord, canonical: bytes) -> Entry:
    chat = record.chat
    return Entry(
        event_id=record.event_id,
        tenant_id=record.tenant_id,
        event_time=to_datetime(record.event_time, "event_time"),
        kind=record.kind,
        actor=record.actor,
        model=chat.model,
        end_user=chat.attribution.end_user,
        canonical=canonical,
        leaf_hash=hashing.leaf_hash(canonical),
    )


def entry_from_canonical(canonical: bytes) -> Entry:
    """Re-derives the entry stored bytes describe (verification uses it).

    Raises:
        ValueError: The bytes do not parse as a valid record.
    """
    record = AuditRecord()
    try:
        record.ParseFromString(canonical)
    except DecodeError as exc:
        raise ValueError(f"stored record does not parse: {exc}") from None
    if not record.HasField("event_time"):
        raise ValueError("stored record has no event_time")
    try:
        return _entry(record, canonical)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


def stored_record(canonical: bytes, index: int, leaf_hash: bytes) -> AuditRecord:
    """The record as read back: the stored bytes plus its index and leaf hash."""
    record = AuditRecord()
    record.ParseFromString(canonical)
    record.index = index
    record.leaf_hash = leaf_hash
    return record
