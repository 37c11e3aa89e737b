"""The audit service's own PostgreSQL role: it may add to the log, never rewrite it.

Migrations run as the owner of the schema (the ``DATABASE_URL`` user). The
service then serves through a login role, ``orchestra_audit_writer``, that owns
nothing and holds only the grants its statements need:

* SELECT and INSERT on every table of the ``audit`` schema (records, the
  Merkle subtrees, checkpoints, sealed bodies, subject keys);
* DELETE on ``audit.bodies`` and ``audit.subject_keys`` only (retention drops
  expired bodies; EraseSubject destroys a subject's key);
* no UPDATE, DELETE or TRUNCATE on the records, and, since it owns no table,
  no way to ALTER a table or disable the triggers that refuse those statements.

Its password is derived from ORCHESTRA_INTERNAL_KEY, so every replica computes
the same one and nothing more has to be stored; the owner sets it at each start.
An owner without the CREATEROLE privilege (some managed databases) cannot
create the role: the service then logs a warning and serves as the owner, which
the triggers still guard against ordinary UPDATE and DELETE statements.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import asyncpg

log = logging.getLogger(__name__)

WRITER = "orchestra_audit_writer"
# Tables the writer may delete from: bodies past retention and erased subjects' keys.
_DELETABLE = ("audit.bodies", "audit.subject_keys")


def writer_password(internal_key: bytes) -> str:
    """The writer's password: a key derived from the suite's internal key."""
    return hmac.new(internal_key, b"orchestra audit writer role", hashlib.sha256).hexdigest()


async def provision_writer(owner: asyncpg.Pool, internal_key: bytes) -> bool:
    """Creates or updates the writer role and its grants, as the schema's owner.

    Returns:
        False when the owner may not create roles (the service keeps the owner's pool).
    """
    password = writer_password(internal_key)
    async with owner.acquire() as conn, conn.transaction():
        # Replicas starting together: one provisions at a time.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('orchestra.audit.role'))")
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", WRITER)
        verb = "ALTER" if exists else "CREATE"
        try:
            async with conn.transaction():  # a savepoint: the lock survives a refusal
                # Utility statements take no parameters: the password is hex, quoted as a literal.
                await conn.execute(f"{verb} ROLE {WRITER} LOGIN NOINHERIT PASSWORD '{password}'")
        except asyncpg.InsufficientPrivilegeError:
            log.warning(
                "the DATABASE_URL role may not %s role %s: the audit service serves as the "
                "schema owner (the triggers still refuse UPDATE and DELETE on the log)",
                verb.lower(),
                WRITER,
            )
            return False
        database = str(await conn.fetchval("SELECT current_database()")).replace('"', '""')
        await conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {WRITER}')
        await conn.execute(f"GRANT USAGE ON SCHEMA audit TO {WRITER}")
        await conn.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA audit TO {WRITER}")
        await conn.execute(f"GRANT DELETE ON {', '.join(_DELETABLE)} TO {WRITER}")
    return True
