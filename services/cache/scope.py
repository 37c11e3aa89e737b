"""What the semantic layer compares, and what it never compares across.

A semantic match may only ever be between two requests that are identical in
everything except the wording of their last user message. :func:`split` cuts a
normalised key (:mod:`services.cache.keys`) into:

* the **scope**: SHA-256 of the canonical document with the last message's
  text replaced by a placeholder. It holds the tenant, the model, the system
  prompt, every earlier turn, every generation parameter and the tools, so two
  requests that differ in any of them have different scopes. The semantic
  index is partitioned by scope (one FAISS index per scope), so a lookup can
  only search entries of its own scope: a cross-tenant hit, or a hit from a
  conversation with a different earlier turn, is impossible by construction,
  not merely unlikely.
* the **text**: the last user message's text, which is what is embedded and
  compared.

Requests for which a near match is never safe have no semantic key (the exact
layer still serves them): a last message that is not the user's (a tool result,
an assistant prefill), a last message with an image, and requests that offer
tools (the answer may be a tool call whose arguments depend on exact wording).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from services.cache.keys import NormalisedKey

SCOPE_VERSION = 1
_PLACEHOLDER = {"semantic": SCOPE_VERSION}


@dataclasses.dataclass(frozen=True)
class SemanticKey:
    """Where a request's semantic neighbours live, and what is compared.

    Attributes:
        tenant: The tenant (also inside ``scope``; kept for the store's keys).
        scope: SHA-256 (hex) of everything but the last user message's text.
        text: The last user message's text, normalised.
    """

    tenant: str
    scope: str
    text: str


def split(key: NormalisedKey) -> SemanticKey | None:
    """The semantic key of ``key``, or None when only an exact match is safe."""
    canonical = key.canonical
    if canonical["tools"]:
        return None
    messages = canonical["messages"]
    last = messages[-1]
    if last["role"] != "ROLE_USER" or last["tool_calls"] or last["tool_call_id"] is not None:
        return None
    parts = last["content"]
    if not parts or any("text" not in part for part in parts):
        return None
    text = "\n".join(part["text"] for part in parts)
    scoped = dict(canonical)
    scoped["messages"] = [*messages[:-1], {**last, "content": _PLACEHOLDER}]
    document = json.dumps(scoped, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    scope = hashlib.sha256(document.encode("utf-8")).hexdigest()
    return SemanticKey(tenant=key.tenant, scope=scope, text=text)
