"""A supervised child: how it runs (`ProcessSpec`), when it comes back after an
exit (`Backoff`), and the running process (`Child`), stopped group-wide."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.cli.embedded.probes import Probe

# The package's logger, so that log lines keep the name they had before the split.
_log = logging.getLogger(__package__)

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

    def next_delay(self, previous: float, ran: float) -> float:
        """The wait before the next start, after a run of ``ran`` seconds
        that followed a wait of ``previous`` (0: none yet)."""
        doubled = previous * 2 if previous and ran < self.reset_after else self.first
        return min(doubled, self.longest)


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
        delay: The last wait before a restart (0: it never exited).
        restart_at: When a "restarting" child starts again (the loop's clock).
    """

    spec: ProcessSpec
    process: asyncio.subprocess.Process
    log_path: Path
    state: str = "running"
    restarts: int = 0
    last_exit: Exit | None = None
    started: float = field(default_factory=time.time)
    delay: float = 0.0
    restart_at: float = 0.0

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
            killpg(self.pid, self.spec.stop_signal)
            if not await wait_exit(self.process, self.spec.stop_timeout):
                _log.warning(
                    "%s did not stop in %ss; killing it", self.spec.name, self.spec.stop_timeout
                )
                killpg(self.pid, signal.SIGKILL)
                await wait_exit(self.process, 10.0)
        # Whatever the leader left behind in its group (a shell's children).
        killpg(self.pid, signal.SIGKILL)
        return self.process.returncode


def exit_reason(code: int) -> str:
    """An exit code in words: "exited with code 1", "killed by SIGKILL"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


async def probe_ready(ready: Probe) -> bool:
    """One readiness check, bounded to 5 s; a failing or hung probe is "not ready"."""
    try:
        return await asyncio.wait_for(ready(), timeout=5.0)
    except Exception:  # noqa: BLE001 - a probe bug or a hung server is "not ready yet"
        _log.debug("readiness probe failed", exc_info=True)
        return False


def killpg(pgid: int, sig: signal.Signals) -> None:
    """Signals a process group, if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def wait_exit(process: asyncio.subprocess.Process, seconds: float) -> bool:
    """Whether ``process`` exited within ``seconds``."""
    try:
        await asyncio.wait_for(process.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def spawn(spec: ProcessSpec, log_path: Path) -> asyncio.subprocess.Process:
    """Starts ``spec``'s command in a new process group, its output appended to ``log_path``."""
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
