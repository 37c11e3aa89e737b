"""A real ``orchestra up`` for benchmarks, and the CPU each of its processes spends.

:class:`Suite` starts the whole suite (Envoy, ext_authz for all but chat, the five services,
embedded PostgreSQL and Redis) from a checkout, by default this one; another
checkout (``git worktree add /tmp/base main~3``) gives a baseline measured in
the same run. :func:`cpu_seconds` reads ``utime + stime`` of every process
below the suite's supervisor from ``/proc/<pid>/stat`` and sums them by part:

    router budget cache audit discovery envoy postgres redis

A part's CPU over a run, divided by the requests of the run, is its CPU per
request: a figure that other load on a shared machine hardly moves (unlike
latency). Processes that exit during a run lose what they spent; the suite's
processes live as long as it does (PostgreSQL backends are pooled).
:func:`proc_rss` and :func:`proc_pss` read a process's resident memory the same way, and
:func:`supervised` what the supervisor recorded of its children (name, pid,
state, restarts).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("router", "budget", "cache", "audit", "discovery")
PARTS = (*SERVICES, "envoy", "postgres", "redis")
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _part(cmdline: list[str], name: str) -> str | None:
    """Which part of the suite a process is, from its command line."""
    for service in SERVICES:
        if f"services.{service}" in cmdline:
            return service
    if name == "envoy" or any(arg.endswith("/envoy") for arg in cmdline[:1]):
        return "envoy"
    if name.startswith("postgres") or (cmdline and cmdline[0].startswith("postgres")):
        return "postgres"
    if name.startswith("redis-server"):
        return "redis"
    return None


def proc_cpu(pid: int) -> float:
    """utime + stime of one process, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_rss(pid: int) -> int:
    """Resident memory of one process, in bytes (field 2 of /proc/PID/statm)."""
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


def proc_pss(pid: int) -> int:
    """Proportional set size of one process, in bytes (/proc/PID/smaps_rollup): its
    resident memory with each shared page divided among the processes that map it."""
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def processes(root_pid: int) -> dict[int, str]:
    """pid -> part, for every process of the suite below ``root_pid``."""
    out: dict[int, str] = {}
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            part = _part(child.cmdline(), child.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if part is not None:
            out[child.pid] = part
    return out


def cpu_seconds(root_pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (part, CPU seconds so far) for every process of the suite."""
    out: dict[int, tuple[str, float]] = {}
    for pid, part in processes(root_pid).items():
        try:
            out[pid] = (part, proc_cpu(pid))
        except OSError:
            continue  # exited meanwhile
    return out


def cpu_delta(
    before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds each part spent between two :func:`cpu_seconds` readings.

    A process that started in between counts from zero. Readings keyed by
    another label than the part (e.g. a replica's name) are summed by it.
    """
    spent = dict.fromkeys(PARTS, 0.0)
    for pid, (part, seconds) in after.items():
        spent[part] = spent.get(part, 0.0) + seconds - (before[pid][1] if pid in before else 0.0)
    return spent


def supervised(state_dir: Path) -> dict[str, dict[str, Any]]:
    """name -> what the supervisor recorded of that child (pid, state, restarts, last exit)."""
    from services.cli.embedded import PROCESSES_FILE

    recorded = json.loads((state_dir / PROCESSES_FILE).read_text())
    return {row["name"]: row for row in recorded["processes"]}


def grid(header: tuple[str, ...], lines: Sequence[tuple[str, ...]]) -> str:
    """A right-aligned text table."""
    rows = [header, *lines]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _counts(replicas: str) -> list[str]:
    """The counts of an ``--replicas`` value."""
    return [part.partition("=")[2] for part in replicas.split(",") if "=" in part]


def _free_base(start: int, ports: int = 5) -> int:
    """The first base from ``start`` whose ``ports`` consecutive ports are all free now."""
    base = start
    while True:
        try:
            for port in range(base, base + ports):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            base = 52000 + (base - 52000 + ports) % 5000


class Suite:
    """``orchestra up --no-local-model`` from ``checkout``, on free ports, state in a temp dir."""

    def __init__(self, checkout: Path, config_text: str, label: str, replicas: str = "") -> None:
        """``replicas``: ``orchestra up --replicas`` (e.g. ``router=2,cache=2``; "" = one each)."""
        self.checkout = checkout.resolve()
        self.label = label
        self._config_text = config_text
        self._replicas = replicas
        self.state_dir = Path()
        self.process: subprocess.Popen[str] | None = None
        self.edge = ""
        self.redis_url = ""

    def start(self) -> None:
        """Starts the suite and waits for its banner."""
        from services.cli.embedded import free_port

        work = Path(tempfile.mkdtemp(prefix="orchestra-bench-"))
        config = work / "orchestra.yaml"
        config.write_text(self._config_text)
        edge_port, redis_port = free_port(), free_port()
        blocks = 1 + max((int(n) - 1 for n in _counts(self._replicas)), default=0)
        ports = len(SERVICES) * blocks
        base = _free_base(52000 + (os.getpid() + hash(self.label)) % 1000 * 5, ports)
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        # The checkout's own code and contracts come first on the path; its children
        # (started with -m from the same working directory) import it too.
        env["PYTHONPATH"] = f"{self.checkout}{os.pathsep}{self.checkout / 'gen'}"
        # fmt: off
        argv = [
            sys.executable, "-m", "services.cli.main", "up", "--no-local-model",
            "--state-dir", str(work / "state"), "--config", str(config),
            "--edge-port", str(edge_port), "--admin-port", str(free_port()),
            "--service-port-base", str(base), "--redis-port", str(redis_port),
        ]
        if self._replicas:
            argv += ["--replicas", self._replicas]
        # fmt: on
        self.state_dir = work / "state"
        self.process = subprocess.Popen(
            argv,
            cwd=self.checkout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        seen: list[str] = []
        for line in self.process.stdout:
            seen.append(line)
            if "Orchestra is up" in line:
                break
        else:
            raise RuntimeError(f"orchestra up ({self.label}) failed:\n{''.join(seen[-30:])}")
        # Drain the rest of its output so the pipe never fills.
        subprocess.Popen(["cat"], stdin=self.process.stdout, stdout=subprocess.DEVNULL)
        self.edge = f"127.0.0.1:{edge_port}"
        password = (work / "state" / "redis.password").read_text().strip()
        self.redis_url = f"redis://:{password}@127.0.0.1:{redis_port}/0"

    @property
    def pid(self) -> int:
        """The supervisor's pid."""
        assert self.process is not None
        return self.process.pid

    def pids(self) -> dict[str, list[int]]:
        """part -> pids."""
        out: dict[str, list[int]] = {}
        for pid, part in processes(self.pid).items():
            out.setdefault(part, []).append(pid)
        return out

    def stop(self) -> None:
        """Stops the suite (SIGTERM, as Ctrl-C would)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wait_idle_outbox(redis_url: str, timeout: float = 30.0) -> None:
    """Waits until the router's outbox streams are empty (every follow-up job delivered).

    Any stream whose key names an outbox counts, the dead-letter stream aside,
    so checkouts that name their streams differently are measured alike.
    """
    import redis

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            streams = client.scan_iter(match="*outbox*", _type="stream")
            keys = [k for k in streams if b"dead" not in k]
            if not any(client.xlen(k) for k in keys):
                return
            time.sleep(0.05)
    finally:
        client.close()
    raise TimeoutError("the outbox did not drain")


def start_fake_upstream(
    latency_ms: int, chunks: int, model: str
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts the project's OpenAI-wire fake (tests/fakes/openai_upstream.py) on a free
    port; returns the process and its base URL (``http://127.0.0.1:PORT/v1``)."""
    from services.cli.embedded import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_upstream", "--port", str(port),
         "--latency-ms", str(latency_ms), "--chunks", str(chunks), "--models", model],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}/v1"
