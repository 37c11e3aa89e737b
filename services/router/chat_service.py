"""``orchestra.router.v1.ChatService``: a thin servicer over the engine.

It authenticates the caller (:func:`services.router.keyauth.chat_caller`:
an API key, or a signed identity) and hands the request, with the client's
deadline, to :class:`~services.router.engine.Engine`; the engine's
:mod:`services.common.errors` exceptions become statuses in the server's
interceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import chat_service_pb2_grpc as chat_grpc
from services.common.identity import IdentitySigner
from services.router.engine import Engine
from services.router.keyauth import RemoteKeys, chat_caller

Context = grpc.aio.ServicerContext[Any, Any]


def deadline(context: Context) -> float | None:
    """Seconds the client allows (None: no deadline)."""
    remaining: float | None = context.time_remaining()
    return remaining


class ChatServicer(chat_grpc.ChatServiceServicer):
    """``orchestra.router.v1.ChatService``."""

    def __init__(self, engine: Engine, signer: IdentitySigner, keys: RemoteKeys) -> None:
        self._engine = engine
        self._signer = signer
        self._keys = keys

    async def ChatStream(
        self, request: chat_api.ChatRequest, context: Context
    ) -> AsyncIterator[chat_api.ChatStreamResponse]:
        """See the proto."""
        identity = await chat_caller(context.invocation_metadata() or (), self._signer, self._keys)
        async for event in self._engine.stream(identity, request, deadline(context)):
            yield event

    async def Chat(self, request: chat_api.ChatRequest, context: Context) -> chat_api.ChatResponse:
        """See the proto: the same flow as ChatStream, folded into one message."""
        identity = await chat_caller(context.invocation_metadata() or (), self._signer, self._keys)
        return await self._engine.chat(identity, request, deadline(context))
