"""An aiohttp application served on a free loopback port, for adapter tests."""

from __future__ import annotations

from aiohttp import web


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    """Starts ``app`` on 127.0.0.1 and a free port; returns its runner (clean it up) and port."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])
