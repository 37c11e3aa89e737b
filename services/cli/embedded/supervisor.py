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
import shutil
import signal
import time
from pathlib import Path
from types import TracebackType

from services.cli.embedded.children import (
    Backoff,
    Child,
    Exit,
    ProcessSpec,
    exit_reason,
    killpg,
    probe_ready,
    spawn,
    wait_exit,
)
from services.cli.embedded.errors import ChildFailed, StopRequested

# The package's logger, so that log lines keep the name they had before the split.
_log = logging.getLogger(__package__)

PROCESSES_FILE = "processes.json"


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
        child = Child(spec, await spawn(spec, log_path), log_path)
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
            if spec.ready is None or await probe_ready(spec.ready):
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
                        self._exited(child, Exit(code, time.time(), exit_reason(code)))
                    elif child.state == "restarting" and loop.time() >= child.restart_at:
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
        killpg(child.pid, signal.SIGKILL)  # what it left behind in its group
        ran = how.at - child.started
        child.delay = self._backoff.next_delay(child.delay, ran)
        child.restart_at = asyncio.get_running_loop().time() + child.delay
        child.state, child.last_exit = "restarting", how
        _log.warning(
            "%s %s after %.1fs; starting it again in %.1fs",
            child.spec.name,
            how.reason,
            ran,
            child.delay,
        )
        self._write_processes()

    async def _restart(self, child: Child) -> None:
        """Starts ``child`` again; a start that fails counts as another exit."""
        spec = child.spec
        try:
            child.process = await spawn(spec, child.log_path)
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
                killpg(child.pid, signal.SIGKILL)
                await wait_exit(child.process, 10.0)
                how = Exit(None, time.time(), f"not ready after {spec.ready_timeout}s")
            else:
                how = Exit(code, time.time(), exit_reason(code) + " while starting")
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
