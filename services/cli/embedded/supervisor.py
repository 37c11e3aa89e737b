"""The process supervisor: children in their own process groups, none outliving it.

Each child runs in its own process group, is stopped (group-wide, escalating
to SIGKILL) in reverse start order, and gets a parent-death signal so that a
SIGKILLed supervisor leaves no orphans either.

With a :class:`Backoff` (as ``orchestra up`` uses it) a child that exits is
started again after a delay that doubles with each exit in a row (and starts
over once the child has run for a while), while the others keep serving;
without one, a child's exit ends the run. What each child is doing is written
to ``<state_dir>/processes.json`` for ``orchestra status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from services.cli.embedded.errors import ChildFailed, StopRequested
from services.cli.embedded.probes import Probe

# The package's logger, so that log lines keep the name they had before the split.
_log = logging.getLogger(__package__)

PROCESSES_FILE = "processes.json"

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


@dataclass(frozen=True)
class Backoff:
    """When a child that exited is started again.

    Attributes:
        first: Seconds before the first restart after a run of at least
            ``reset_after`` seconds.
        longest: The delay doubles with each exit in a row, up to this.
        reset_after: A child that ran this long before exiting starts again
            after ``first``.
    """

    first: float = 0.5
    longest: float = 30.0
    reset_after: float = 60.0


@dataclass(frozen=True)
class Exit:
    """How a child's last run ended.

    Attributes:
        code: Its exit code (negative: killed by that signal), or None when it
            was stopped for not getting ready in time.
        at: When (seconds since the epoch).
        reason: One line: "exited with code 1", "killed by SIGKILL", …
    """

    code: int | None
    at: float
    reason: str


@dataclass(eq=False)
class Child:
    """A child process started by `Supervisor.start` (restarted in place).

    Attributes:
        spec: How it runs.
        process: Its current process.
        log_path: Where its output goes (appended to across restarts).
        state: "running", "restarting" (waiting out its backoff) or "starting".
        restarts: How many times it was started again.
        last_exit: How its last run ended (None: it never exited).
        started: When its current process was started (seconds since the epoch).
    """

    spec: ProcessSpec
    process: asyncio.subprocess.Process
    log_path: Path
    state: str = "running"
    restarts: int = 0
    last_exit: Exit | None = None
    started: float = field(default_factory=time.time)
    _delay: float = 0.0
    _restart_at: float = 0.0

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


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


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

    Given a `Backoff`, `wait` also starts a child that exited again (in the
    same slot of the start order, with the same spec and log), and only a
    signal ends it.

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

    def __init__(self, state_dir: Path, restart: Backoff | None = None) -> None:
        """Creates the supervisor.

        Args:
            state_dir: Root of all state.
            restart: When to start a child that exited again (None: a child's
                exit ends `wait`).
        """
        self.state_dir = state_dir
        self._backoff = restart
        self._restarting: set[asyncio.Task[None]] = set()
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
        child = Child(spec, await self._spawn(spec, log_path), log_path)
        self._children.append(child)
        _log.info("started %s (pid %d), log %s", spec.name, child.pid, log_path)
        try:
            await self._wait_ready(child)
        except ChildFailed:
            await child.stop()
            self._children.remove(child)
            raise
        self._write_processes()
        return child

    async def _spawn(self, spec: ProcessSpec, log_path: Path) -> asyncio.subprocess.Process:
        argv, user = list(spec.argv), spec.user
        if sys.platform == "linux":
            uid, gid = -1, -1
            if user is not None:
                entry = pwd.getpwnam(user)
                uid, gid, user = entry.pw_uid, entry.pw_gid, None
            ids = (int(spec.stop_signal), os.getpid(), uid, gid)
            argv = [sys.executable, "-I", "-S", "-c", _LAUNCHER, *map(str, ids), *argv]
        with log_path.open("ab") as log:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd,
                env={**os.environ, **spec.env} if spec.env else None,
                user=user,
                process_group=0,
            )

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
        """Waits until a stop is requested (signal), restarting children that exit.

        Without a `Backoff`, the first child to exit ends the wait.

        Returns:
            The reason, also kept in `stop_reason`.
        """
        self._waiting = True
        loop = asyncio.get_running_loop()
        try:
            while not self._stop.is_set():
                for child in self._children:
                    if child.state == "running" and (code := child.process.returncode) is not None:
                        if self._backoff is None:
                            self.request_stop(f"{child.spec.name} exited with code {code}")
                            break
                        self._exited(child, Exit(code, time.time(), _exit_reason(code)))
                    elif child.state == "restarting" and loop.time() >= child._restart_at:
                        child.state = "starting"
                        task = loop.create_task(self._restart(child))
                        self._restarting.add(task)
                        task.add_done_callback(self._restarting.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=0.2)
        finally:
            self._waiting = False
        assert self.stop_reason is not None
        return self.stop_reason

    def _exited(self, child: Child, how: Exit) -> None:
        """Records ``child``'s exit and schedules its restart after the backoff."""
        assert self._backoff is not None
        _killpg(child.pid, signal.SIGKILL)  # what it left behind in its group
        backoff = self._backoff
        ran = how.at - child.started
        child._delay = (
            backoff.first if ran >= backoff.reset_after or not child._delay else child._delay * 2
        )
        child._delay = min(child._delay, backoff.longest)
        child._restart_at = asyncio.get_running_loop().time() + child._delay
        child.state, child.last_exit = "restarting", how
        _log.warning(
            "%s %s after %.1fs; starting it again in %.1fs",
            child.spec.name,
            how.reason,
            ran,
            child._delay,
        )
        self._write_processes()

    async def _restart(self, child: Child) -> None:
        """Starts ``child`` again; a start that fails counts as another exit."""
        spec = child.spec
        try:
            child.process = await self._spawn(spec, child.log_path)
        except OSError as exc:
            self._exited(child, Exit(None, time.time(), f"could not start: {exc}"))
            return
        child.started, child.restarts = time.time(), child.restarts + 1
        _log.info("started %s again (pid %d, restart %d)", spec.name, child.pid, child.restarts)
        self._write_processes()
        try:
            await self._wait_ready(child)
        except StopRequested:
            return
        except ChildFailed:
            code = child.process.returncode
            if code is None:
                _killpg(child.pid, signal.SIGKILL)
                await _wait_exit(child.process, 10.0)
                how = Exit(None, time.time(), f"not ready after {spec.ready_timeout}s")
            else:
                how = Exit(code, time.time(), _exit_reason(code) + " while starting")
            self._exited(child, how)
            return
        child.state = "running"
        _log.info("%s is ready again", spec.name)
        self._write_processes()

    def _write_processes(self) -> None:
        """Writes what each child is doing to ``processes.json`` (atomically)."""
        rows = [
            {
                "name": c.spec.name,
                "pid": c.pid,
                "state": c.state,
                "restarts": c.restarts,
                "started": c.started,
                "last_exit": None
                if c.last_exit is None
                else {"code": c.last_exit.code, "at": c.last_exit.at, "reason": c.last_exit.reason},
            }
            for c in self._children
        ]
        path = self.state_dir / PROCESSES_FILE
        try:
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps({"supervisor": os.getpid(), "processes": rows}))
            temporary.replace(path)
        except OSError as exc:  # status is a convenience; never stop the suite for it
            _log.warning("could not write %s: %s", path, exc)

    async def stop(self) -> None:
        """Stops every child, the last started first. Idempotent."""
        self._stopping = True
        for task in list(self._restarting):
            task.cancel()
        if self._restarting:
            await asyncio.gather(*self._restarting, return_exceptions=True)
        try:
            while self._children:
                child = self._children[-1]
                code = await child.stop()
                _log.info("stopped %s (exit code %s)", child.spec.name, code)
                self._children.pop()
        finally:
            self._stopping = False
