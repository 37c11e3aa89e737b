"""The cache's Redis keyspace: what lives under which key.

Every replica reads and writes the same Redis, so an entry stored through one
replica is served by all of them, and a restart loses nothing. Layout::

    cache:{T}:e:<entry_id>  HASH answer, model, answer_model, end_user,
                            request_id, created_ms, size (and scope, text,
                            vec, adapt for the semantic layer); EXPIRE = the TTL
    cache:{T}:m:<model>     SET of entry ids whose key model or answering
                            model is <model>
    cache:{T}:u:<end_user>  SET of entry ids stored for that end user
    cache:{T}:stats         HASH of counters (see :mod:`services.cache.stats`)
    cache:{T}:age           ZSET entry id -> created_ms: eviction order
    cache:{T}:size          HASH entry id -> bytes, and ``_total`` -> their sum
    cache:changes           STREAM of semantic adds and deletes (all tenants):
                            fields op (add|del), tenant, id; trimmed to about
                            CHANGES_MAXLEN entries (:mod:`services.cache.changes`)

An entry the semantic layer can match also holds ``scope``, ``text`` (the
compared message) and ``vec`` (its embedding, float32 bytes), so any replica
can rebuild its FAISS view from Redis alone, without embedding again.

``T`` is the tenant id percent-encoded (everything but letters, digits and
``-._~``), between braces. The braces make it a Redis Cluster hash tag, so all
of a tenant's keys share one slot and the multi-key scripts of
:mod:`services.cache.store` stay cluster-safe; the encoding means ``T`` holds
neither a brace, a colon nor a glob character, so a pattern built from it
matches that tenant alone: ``cache:{acme}:e:*`` never reaches
``cache:{acme-eu}:…``.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

CHANGES = "cache:changes"
ENTRY_PATTERN = "cache:{*}:e:*"  # every tenant's entries (SCAN match)


def tenant_tag(tenant: str) -> str:
    """The prefix of every key of ``tenant``: ``cache:{<encoded tenant>}``."""
    return "cache:{" + quote(tenant, safe="") + "}"


def entry_key(tenant: str, entry_id: str) -> str:
    """The key of one entry."""
    return f"{tenant_tag(tenant)}:e:{entry_id}"


def model_index(tenant: str, model: str) -> str:
    """The set of entry ids for ``model``."""
    return f"{tenant_tag(tenant)}:m:{model}"


def user_index(tenant: str, end_user: str) -> str:
    """The set of entry ids stored for ``end_user``."""
    return f"{tenant_tag(tenant)}:u:{end_user}"


def stats_key(tenant: str) -> str:
    """The hash of ``tenant``'s counters."""
    return f"{tenant_tag(tenant)}:stats"


def age_key(tenant: str) -> str:
    """The sorted set of ``tenant``'s entry ids by creation time (eviction order)."""
    return f"{tenant_tag(tenant)}:age"


def size_key(tenant: str) -> str:
    """The hash of ``tenant``'s entry sizes and their ``_total``."""
    return f"{tenant_tag(tenant)}:size"


def split_entry_key(key: str) -> tuple[str, str]:
    """(tenant, entry id) of an entry key: the inverse of :func:`entry_key`."""
    tag, _, entry_id = key.rpartition(":e:")
    return unquote(tag.removeprefix("cache:{").removesuffix("}")), entry_id
