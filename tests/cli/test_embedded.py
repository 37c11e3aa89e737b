"""The embedded runtime: real PostgreSQL and Redis from wheels, and the supervisor."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest
import redis.asyncio

from services.cli import client
from services.cli.embedded import (
    PROCESSES_FILE,
    Backoff,
    ChildFailed,
    ProcessSpec,
    Supervisor,
    free_port,
    start_postgres,
    start_redis,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[Supervisor]:
    sup = Supervisor(tmp_path)
    try:
        yield sup
    finally:
        await sup.stop()


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    """Waits for ``pids`` to end; returns those still running after ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def group_pids(pid: int) -> list[int]:
    """The child ``pid`` and all its descendants."""
    process = psutil.Process(pid)
    return [pid, *(c.pid for c in process.children(recursive=True))]


async def test_postgres_keeps_data_across_restarts(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    pg = await start_postgres(sup, tmp_path)
    try:
        conn = await asyncpg.connect(pg.url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.execute("CREATE TABLE survivor (v text); INSERT INTO survivor VALUES ('kept')")
        await conn.close()
        server_pids = group_pids(pg.child.pid)
        assert len(server_pids) > 1  # postmaster and its background processes
    finally:
        await sup.stop()
    assert wait_gone(server_pids) == []

    pg = await start_postgres(sup, tmp_path)
    try:
        conn = await asyncpg.connect(pg.url)
        assert await conn.fetchval("SELECT v FROM survivor") == "kept"
        await conn.close()
    finally:
        await sup.stop()
    assert (tmp_path / "logs" / "postgres.log").stat().st_size > 0


async def test_postgres_requires_the_generated_password(supervisor: Supervisor) -> None:
    pg = await start_postgres(supervisor, supervisor.state_dir)
    password = (supervisor.state_dir / "postgres.password").read_text().strip()
    forged = pg.url.replace(f":{password}@", ":wrong@")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(forged)


async def test_redis_keeps_data_across_restarts(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    port = free_port()
    server = await start_redis(sup, tmp_path, port=port)
    client = redis.asyncio.from_url(server.url)
    await client.set("orchestra:test", "kept")
    assert await client.eval("return redis.call('GET', KEYS[1])", 1, "orchestra:test") == b"kept"
    await client.aclose()
    await sup.stop()

    server = await start_redis(sup, tmp_path, port=port)
    assert server.url.startswith("redis://:") and server.url.endswith(f"@127.0.0.1:{port}/0")
    client = redis.asyncio.from_url(server.url)
    try:
        assert await client.get("orchestra:test") == b"kept"
    finally:
        await client.aclose()
        await sup.stop()


async def test_stop_leaves_no_process_behind(supervisor: Supervisor) -> None:
    # A shell with background children, and one that ignores SIGTERM.
    await supervisor.start(ProcessSpec("family", ["sh", "-c", "sleep 300 & sleep 300 & wait"]))
    stubborn = ProcessSpec("stubborn", ["sh", "-c", "trap '' TERM; sleep 300"], stop_timeout=0.5)
    await supervisor.start(stubborn)
    await asyncio.sleep(0.3)  # let the shells fork
    pids = [pid for child in supervisor.children for pid in group_pids(child.pid)]
    assert len(pids) >= 5

    await supervisor.stop()

    assert supervisor.children == ()
    assert wait_gone(pids) == []


async def test_child_that_exits_while_starting_raises_with_its_log(
    supervisor: Supervisor,
) -> None:
    async def never() -> bool:
        return False

    spec = ProcessSpec("broken", ["sh", "-c", "echo boom; exit 3"], ready=never)
    with pytest.raises(ChildFailed, match=r"(?s)exited with code 3.*boom"):
        await supervisor.start(spec)
    with pytest.raises(ChildFailed, match="command not found"):
        await supervisor.start(ProcessSpec("missing", ["no-such-binary-orchestra"]))


async def test_wait_returns_when_a_child_exits(supervisor: Supervisor) -> None:
    await supervisor.start(ProcessSpec("short", ["sh", "-c", "sleep 0.2; exit 4"]))
    assert await asyncio.wait_for(supervisor.wait(), 10) == "short exited with code 4"


async def _until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _recorded(state_dir: Path) -> dict[str, dict[str, Any]]:
    data = json.loads((state_dir / PROCESSES_FILE).read_text())
    return {row["name"]: row for row in data["processes"]}


async def test_a_child_that_exits_is_started_again_while_the_others_keep_running(
    tmp_path: Path,
) -> None:
    sup = Supervisor(tmp_path, restart=Backoff(first=0.1, longest=0.4, reset_after=60))
    try:
        steady = await sup.start(ProcessSpec("steady", ["sleep", "300"]))
        flaky = await sup.start(ProcessSpec("flaky", ["sleep", "300"]))
        steady_pid, first_pid = steady.pid, flaky.pid
        waiting = asyncio.create_task(sup.wait())
        os.kill(first_pid, signal.SIGKILL)
        await _until(lambda: flaky.restarts == 1 and flaky.state == "running")
        assert flaky.pid != first_pid and alive(flaky.pid)
        assert flaky.last_exit is not None and flaky.last_exit.reason == "killed by SIGKILL"
        assert steady.pid == steady_pid and steady.restarts == 0 and alive(steady_pid)
        recorded = _recorded(tmp_path)
        assert recorded["flaky"]["restarts"] == 1 and recorded["flaky"]["pid"] == flaky.pid
        assert recorded["flaky"]["last_exit"]["reason"] == "killed by SIGKILL"
        assert recorded["steady"]["last_exit"] is None

        # Exits in a row wait longer each time: 0.1 s, then 0.2 s.
        os.kill(flaky.pid, signal.SIGKILL)
        await _until(lambda: flaky.restarts == 2 and flaky.state == "running")
        assert flaky.delay == pytest.approx(0.2)
        assert not waiting.done()  # only a signal ends the run now

        # `orchestra status` shows it.
        table = "\n".join("  ".join(row) for row in client._processes(tmp_path))
        assert "flaky" in table and "killed by SIGKILL" in table
    finally:
        await sup.stop()
    assert wait_gone([steady_pid, flaky.pid]) == []


async def test_a_child_that_keeps_failing_backs_off_to_the_longest_delay(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, restart=Backoff(first=0.05, longest=0.2, reset_after=60))
    try:
        marker = tmp_path / "started"
        # Runs once, then fails at every start: exits before it is ready.
        script = f"if [ -e {marker} ]; then echo again; exit 7; fi; touch {marker}; sleep 300"
        crashing = await sup.start(ProcessSpec("crashing", ["sh", "-c", script]))
        waiting = asyncio.create_task(sup.wait())
        await _until(marker.exists)
        os.kill(crashing.pid, signal.SIGKILL)
        await _until(lambda: crashing.restarts >= 4)
        assert crashing.delay == pytest.approx(0.2)
        assert crashing.last_exit is not None and crashing.last_exit.code == 7
        assert not waiting.done()
    finally:
        await sup.stop()  # also while a restart is pending
    assert sup.children == ()


async def test_status_says_when_the_supervisor_is_gone(tmp_path: Path) -> None:
    (tmp_path / PROCESSES_FILE).write_text(
        json.dumps(
            {
                "supervisor": 2**22 + 12345,  # above pid_max's default: no such process
                "processes": [
                    {
                        "name": "cache",
                        "pid": 1,
                        "state": "running",
                        "restarts": 2,
                        "started": 0.0,
                        "last_exit": {"code": -9, "at": 100.0, "reason": "killed by SIGKILL"},
                    }
                ],
            }
        )
    )
    rows = client._processes(tmp_path, now=160.0)
    gone = "not running (supervisor gone)"
    assert rows[1] == ("cache", "1", gone, "2", "killed by SIGKILL, 60s ago")
    assert client._processes(tmp_path / "nowhere") == []
    out = io.StringIO()
    client._table(rows, out)
    header = out.getvalue().splitlines()[0].split()
    assert header == ["PROCESS", "PID", "STATE", "RESTARTS", "LAST", "EXIT"]


# Runs a supervisor in a separate interpreter so that the test can signal or
# kill it. It prints the pid of its first child, then either waits or is stuck
# starting a second child that never gets ready; at the end it prints why it
# stopped.
SUPERVISED = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from services.cli.embedded import ProcessSpec, Supervisor

    async def never() -> bool:
        return False

    async def main() -> None:
        async with Supervisor(Path(sys.argv[1])) as sup:
            child = await sup.start(ProcessSpec("sleeper", ["sleep", "300"]))
            print(child.pid, flush=True)
            if sys.argv[2] == "starting":
                hung = ProcessSpec("hung", ["sleep", "300"], ready=never, ready_timeout=300)
                await sup.start(hung)
            await sup.wait()
        print(sup.stop_reason, flush=True)

    asyncio.run(main())
    """
)


def run_supervised(state_dir: Path, mode: str = "wait") -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED, str(state_dir), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


@pytest.mark.parametrize("mode", ["wait", "starting"])
def test_sigterm_stops_the_supervisor_and_its_children(tmp_path: Path, mode: str) -> None:
    process, child_pid = run_supervised(tmp_path, mode)
    expected = 2 if mode == "starting" else 1
    deadline = time.monotonic() + 10
    while len(children := psutil.Process(process.pid).children()) < expected:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert child_pid in {c.pid for c in children}

    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=20)

    assert process.returncode == 0
    assert out.strip() == "SIGTERM"
    assert wait_gone([c.pid for c in children]) == []


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_killed_supervisor_leaves_no_orphans(tmp_path: Path) -> None:
    process, child_pid = run_supervised(tmp_path)
    assert psutil.Process(child_pid).ppid() == process.pid
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert wait_gone([child_pid]) == []
