"""Token counts and prices, in integer micro-USD.

Prices come from discovery as micro-USD per million tokens. Costs round up to
the next micro-USD so that a request is never charged less than it cost. When a
provider reports no usage, tokens are estimated (about four characters a token,
plus a few per message for the chat template) and marked as estimated.
"""

from __future__ import annotations

from collections.abc import Iterable

from orchestra.common.v1 import chat_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2

_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4  # role markers and separators of chat templates
_MILLION = 1_000_000


def estimate_text_tokens(text: str) -> int:
    """Estimated tokens in ``text`` (at least 1 for non-empty text)."""
    return (len(text) + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN


def estimate_prompt_tokens(
    messages: Iterable[chat_pb2.Message], tools: Iterable[chat_pb2.Tool] = ()
) -> int:
    """Estimated prompt tokens of a conversation and its tool declarations."""
    total = 0
    for message in messages:
        total += _TOKENS_PER_MESSAGE
        for part in message.content:
            if part.WhichOneof("part") == "text":
                total += estimate_text_tokens(part.text)
            else:
                total += 85  # a low-detail image, as OpenAI bills it
        for call in message.tool_calls:
            total += estimate_text_tokens(call.name + call.arguments)
    for tool in tools:
        total += estimate_text_tokens(tool.function.name + tool.function.description) + 20
    return total


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def cost_micro_usd(usage: chat_pb2.Usage, pricing: discovery_pb2.Pricing) -> int:
    """What ``usage`` costs at ``pricing``, rounded up."""
    cached = min(usage.cached_prompt_tokens, usage.prompt_tokens)
    cached_price = pricing.cached_input_micro_usd_per_mtok or pricing.input_micro_usd_per_mtok
    numerator = (
        (usage.prompt_tokens - cached) * pricing.input_micro_usd_per_mtok
        + cached * cached_price
        + usage.completion_tokens * pricing.output_micro_usd_per_mtok
    )
    return _ceil_div(numerator, _MILLION)


def worst_case_micro_usd(
    prompt_tokens: int, max_tokens: int, pricing: discovery_pb2.Pricing
) -> int:
    """The most a request can cost: its prompt plus max_tokens of output."""
    usage = chat_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=max_tokens)
    return cost_micro_usd(usage, pricing)


def is_priced(model: discovery_pb2.Model) -> bool:
    """Whether the model's price is known (an unpriced model is never free)."""
    return model.price_source != discovery_pb2.PRICE_SOURCE_UNSPECIFIED
