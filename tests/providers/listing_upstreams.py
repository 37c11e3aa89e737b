"""Small real HTTP upstreams for the model-listing formats the OpenAI fake lacks.

:class:`FakeOllama` answers Ollama's ``GET /api/tags``, ``GET /api/ps`` and
``POST /api/show`` the way Ollama does; :class:`JsonUpstream` serves fixed JSON pages per path and
query (for Anthropic's and Gemini's paginated ``/models``). Both listen on
127.0.0.1 on a free port and record the requests they get.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclasses.dataclass
class Seen:
    """One request an upstream received."""

    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]


class _Server:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        self.requests.append(Seen(request.path, dict(request.query), CIMultiDict(request.headers)))
        response: web.StreamResponse = await handler(request)
        return response


class FakeOllama(_Server):
    """Ollama's native listing: ``/api/tags`` (downloaded), ``/api/ps`` (loaded, with
    memory), ``/api/show`` (``model_info`` with the context length)."""

    SIZE = 2019393189
    SIZE_VRAM = 1509949440

    def __init__(
        self,
        models: list[str],
        loaded: list[str] | None = None,
        contexts: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.models = list(models)
        self.loaded = list(loaded or [])
        self.contexts = dict(contexts or {})
        self.tags_status = 200

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/tags", self._tags),
            web.get("/api/ps", self._ps),
            web.post("/api/show", self._show),
        ]

    async def _show(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("model")
        if name not in self.models:
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        info: dict[str, Any] = {"general.architecture": "llama", "general.parameter_count": 3}
        if name in self.contexts:
            info["llama.context_length"] = self.contexts[name]
        return web.json_response({"modelfile": "", "details": {}, "model_info": info})

    @staticmethod
    def _entry(name: str) -> dict[str, Any]:
        family = name.split(":", 1)[0]
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
            "size": 2019393189,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family,
                "families": [family],
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        }

    async def _tags(self, request: web.Request) -> web.Response:
        if self.tags_status != 200:
            return web.json_response({"error": "something went wrong"}, status=self.tags_status)
        return web.json_response({"models": [self._entry(m) for m in self.models]})

    async def _ps(self, request: web.Request) -> web.Response:
        models = [
            {
                **self._entry(m),
                "expires_at": "2099-01-01T00:00:00Z",
                "size": self.SIZE,
                "size_vram": self.SIZE_VRAM,
            }
            for m in self.loaded
        ]
        return web.json_response({"models": models})


class JsonUpstream(_Server):
    """Answers ``GET path`` with a JSON body chosen by a function of the query."""

    def __init__(self, pages: dict[str, Callable[[dict[str, str]], Any]]) -> None:
        super().__init__()
        self.pages = pages

    def routes(self) -> list[web.RouteDef]:
        return [web.get(path, self._handler(path)) for path in self.pages]

    def _handler(self, path: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            return web.json_response(self.pages[path](dict(request.query)))

        return handle
