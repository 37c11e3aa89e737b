"""`orchestra models`: price, context and health from several provider types at once."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.cli.client import _table, model_rows
from tests.discovery.conftest import SECRET, Handle
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.faults import Fault
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI

Start = Callable[..., Awaitable[Handle]]
AsCaller = Callable[..., list[tuple[str, str]]]


async def test_models_table_shows_every_provider_type(
    discovery: Start, as_caller: AsCaller
) -> None:
    async with (
        FakeOpenAI(api_key=SECRET, models=["gpt-4o-mini"]) as openai,
        FakeAnthropic(api_key=SECRET, models=["claude-haiku-4-5"]) as anthropic,
        FakeOllama(models=["llama3.2:latest"]) as ollama,
    ):
        openai.set_fault(Fault.http_error(503), endpoint="chat")  # listing works, chat fails
        config = f"""
providers:
  - {{id: oai, type: openai, base_url: "{openai.url}", credential: {SECRET}}}
  - {{id: ant, type: anthropic, base_url: "{anthropic.base_url}", credential: {SECRET}}}
  - {{id: box, type: ollama, base_url: "{ollama.base_url}", local: true}}
"""
        handle = await discovery(config)
        for _ in range(3):  # enough failed probes for the OpenAI one to turn unhealthy
            await handle.service.prober.run_once(force=True)
        listed = await handle.stub.ListModels(
            pb.ListModelsRequest(), metadata=as_caller("acme", "read")
        )

    rows = model_rows(listed.models)
    out = io.StringIO()
    _table(rows, out)
    by_name = {r[0]: dict(zip(rows[0], r, strict=True)) for r in rows[1:]}
    assert set(by_name) == {"oai/gpt-4o-mini", "ant/claude-haiku-4-5", "box/llama3.2:latest"}

    gpt = by_name["oai/gpt-4o-mini"]
    assert gpt["TYPE"] == "openai"
    assert (gpt["IN/MTOK"], gpt["OUT/MTOK"], gpt["CONTEXT"]) == ("$0.15", "$0.60", "128000")
    assert gpt["HEALTH"] == "unhealthy" and gpt["ERRORS"] == "100%" and gpt["TTFT"] == "-"

    claude = by_name["ant/claude-haiku-4-5"]
    assert claude["TYPE"] == "anthropic" and claude["HEALTH"] == "healthy"
    assert claude["TTFT"].endswith(" ms") and claude["ERRORS"] == "0%"
    assert claude["IN/MTOK"].startswith("$")

    llama = by_name["box/llama3.2:latest"]
    assert llama["TYPE"] == "ollama" and llama["HEALTH"] == "healthy"
    assert llama["IN/MTOK"] == "$0.00"  # local: free by declaration
    assert llama["CONTEXT"] == "131072"  # from /api/show
    assert llama["LOADED"] == "yes (1.9 GiB)"  # from /api/ps size_vram

    text = out.getvalue()
    assert text.splitlines()[0].split() == list(rows[0])
    assert SECRET not in text
