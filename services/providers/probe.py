"""The health probe's request: a tiny chat any provider answers in a few tokens.

Discovery sends it through the provider's own adapter (see
:func:`services.providers.adapter_for`), so every wire format is probed
exactly as chat traffic uses it; it times the answer itself.
"""

from __future__ import annotations

from orchestra.common.v1 import chat_pb2
from services.providers.base import UpstreamRequest

PROBE_PROMPT = "Reply with the single word OK."
PROBE_MAX_TOKENS = 8


def probe_request(model_id: str, timeout: float) -> UpstreamRequest:
    """The tiny chat request a probe sends."""
    message = chat_pb2.Message(
        role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=PROBE_PROMPT)]
    )
    return UpstreamRequest(
        model_id=model_id,
        messages=[message],
        tools=[],
        tool_choice=None,
        generation=chat_pb2.GenerationConfig(max_tokens=PROBE_MAX_TOKENS, temperature=0.0),
        timeout=timeout,
    )
