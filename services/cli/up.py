"""``orchestra up``: the whole suite on one machine, state in one directory.

Starts, as supervised children: PostgreSQL and Redis (embedded, unless
``DATABASE_URL`` / ``REDIS_URL`` name external servers), the packaged local
model, the five services (``--replicas router=2,cache=2``: several processes
of a service, on consecutive port blocks, behind Envoy and the services' own
round-robin channels) and the Envoy edge. A child that exits is started
again with backoff (0.5 s, doubling to 30 s while it keeps failing) while the
others keep serving; ``orchestra status`` shows each child's restarts and last
exit. Ctrl-C or SIGTERM stops them all; a second ``up`` on the same state
directory keeps the data.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

from services.cli import edge, embedded
from services.common.config_file import load_config_file
from services.common.settings import SERVICES

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
SUITE_FILE = "suite.json"
API_KEY_FILE = "api-key"


@dataclasses.dataclass(frozen=True)
class Ports:
    """Where each part listens (all on 127.0.0.1)."""

    edge: int = 8080
    admin: int = 9901
    services: int = 50051  # router, budget, cache, audit, discovery: this and the next four
    model: int = 8090
    redis: int = 6390

    def service(self, name: str, replica: int = 0) -> int:
        """The port of one service's replica (0: the first): replica ``k`` of
        the service at ``services + i`` listens on ``services + i + 5 * k``."""
        return self.services + SERVICES.index(name) + len(SERVICES) * replica


MAX_REPLICAS = 8


def parse_replicas(text: str) -> dict[str, int]:
    """``router=2,cache=2`` as {service: replicas}; services not named run one.

    Raises:
        ValueError: An unknown service, or a count outside 1 to 8.
    """
    counts = dict.fromkeys(SERVICES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition("=")
        name = name.strip()
        if not sep or name not in SERVICES:
            raise ValueError(f"--replicas takes service=count for {', '.join(SERVICES)}: {part!r}")
        if not count.strip().isdigit() or not 1 <= int(count) <= MAX_REPLICAS:
            raise ValueError(f"--replicas {name}: a count from 1 to {MAX_REPLICAS}, got {count!r}")
        counts[name] = int(count)
    return counts


def _replica_name(name: str, replica: int) -> str:
    """The child's name: the service's own for the first replica, name-2, name-3, … after."""
    return name if replica == 0 else f"{name}-{replica + 1}"


def _secret_file(path: Path, make: str) -> str:
    """The secret in ``path``; ``make`` is written there (mode 0600) if it is absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(make)
    return path.read_text().strip()


def _audit_signing_key(state_dir: Path) -> Path:
    """The audit log's Ed25519 checkpoint key (32 random bytes, base64), made once."""
    path = state_dir / "audit-signing.key"
    _secret_file(path, base64.b64encode(secrets.token_bytes(32)).decode())
    return path


def dev_api_key(state_dir: Path) -> str:
    """The development API key of this state directory (created once)."""
    return _secret_file(state_dir / API_KEY_FILE, f"ok_dev_{secrets.token_urlsafe(24)}")


async def run(
    state_dir: Path,
    *,
    config: Path | None,
    ports: Ports,
    local_model: bool,
    model_threads: int,
    replicas: dict[str, int] | None = None,
) -> str:
    """Starts the suite and serves until a signal, restarting children that exit.

    Args:
        replicas: How many processes of each service (default: one each);
            Envoy and the services' own channels balance over them.

    Returns:
        Why it stopped.
    """
    counts = dict.fromkeys(SERVICES, 1) | (replicas or {})
    addrs = {n: [f"127.0.0.1:{ports.service(n, k)}" for k in range(counts[n])] for n in SERVICES}
    state_dir = state_dir.resolve()  # noqa: ASYNC240 - once, at start
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path = config or DEFAULT_CONFIG
    env = {
        "ORCHESTRA_INTERNAL_KEY": _secret_file(
            state_dir / "internal.key", secrets.token_urlsafe(32)
        ),
        "ORCHESTRA_DEV_KEY": dev_api_key(state_dir),
        "ORCHESTRA_AUDIT_SIGNING_KEY_FILE": str(_audit_signing_key(state_dir)),
        "ORCHESTRA_LOCAL_MODEL_URL": f"http://127.0.0.1:{ports.model}/v1",
        "ORCHESTRA_CONFIG": str(config_path),
        **{f"ORCHESTRA_{n.upper()}_ADDR": ",".join(addrs[n]) for n in SERVICES},
    }
    os.environ.update(env)  # ${VAR}s in the config file, and the children
    load_config_file(config_path)  # fail here, with the field named, not in five children
    async with embedded.Supervisor(state_dir, restart=embedded.Backoff()) as supervisor:
        database_url = (
            os.environ.get("DATABASE_URL")
            or (await embedded.start_postgres(supervisor, state_dir)).url
        )
        redis_url = (
            os.environ.get("REDIS_URL")
            or (await embedded.start_redis(supervisor, state_dir, ports.redis)).url
        )
        env |= {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
        if local_model:
            await embedded.start_local_model(supervisor, ports.model, model_threads)
        # Discovery lists the providers at start and the router watches discovery,
        # so they come last.
        for name in ("budget", "audit", "cache", "discovery", "router"):
            for replica in range(counts[name]):
                port = ports.service(name, replica)
                await supervisor.start(
                    embedded.ProcessSpec(
                        _replica_name(name, replica),
                        [sys.executable, "-m", f"services.{name}"],
                        ready=embedded.grpc_health_probe(f"127.0.0.1:{port}"),
                        env=env | {"ORCHESTRA_PORT": str(port)},
                        ready_timeout=60.0,
                        # The whole suite stops together: no other replica takes
                        # over, so SIGINT, which skips the SIGTERM drain.
                        stop_signal=signal.SIGINT,
                    )
                )
        envoy_config = edge.render_envoy_config(
            state_dir / "envoy.yaml",
            edge_port=ports.edge,
            admin_port=ports.admin,
            **{  # type: ignore[arg-type]
                n: [("127.0.0.1", ports.service(n, k)) for k in range(counts[n])] for n in SERVICES
            },
        )
        await supervisor.start(edge.envoy_spec(envoy_config, ports.admin))
        _write_suite_file(state_dir, ports, database_url, redis_url, local_model, addrs)
        print(_banner(state_dir, ports), flush=True)
        return await supervisor.wait()
    return supervisor.stop_reason or "stopped"  # a signal during start-up


def _write_suite_file(
    state_dir: Path,
    ports: Ports,
    database_url: str,
    redis_url: str,
    local_model: bool,
    addrs: dict[str, list[str]],
) -> None:
    """Records where everything runs, for ``orchestra status`` and ``chat``."""
    suite = {
        "edge": f"127.0.0.1:{ports.edge}",
        "admin": f"http://127.0.0.1:{ports.admin}",
        "services": {n: a[0] for n, a in addrs.items()},
        "replicas": addrs,
        "local_model": f"http://127.0.0.1:{ports.model}/v1" if local_model else "",
        "postgres": _redact(database_url),
        "redis": _redact(redis_url),
        "pid": os.getpid(),
    }
    (state_dir / SUITE_FILE).write_text(json.dumps(suite, indent=2))


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "…@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def read_suite_file(state_dir: Path) -> dict[str, object] | None:
    """What ``up`` recorded, or None if it never ran here."""
    try:
        data: dict[str, object] = json.loads((state_dir / SUITE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data


def _banner(state_dir: Path, ports: Ports) -> str:
    return (
        f"Orchestra is up. Edge (gRPC, gRPC-Web): 127.0.0.1:{ports.edge}\n"
        f"  state:   {state_dir} (API key in {state_dir / API_KEY_FILE})\n"
        '  try:     orchestra chat "hello"\n'
        f"           grpcurl -plaintext 127.0.0.1:{ports.edge} list\n"
        "  stop:    Ctrl-C"
    )
