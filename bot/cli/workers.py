"""`relaybot serve --workers N`: N bot processes on one port, and the small supervisor that keeps them running.

One Python process runs on one core (the GIL). With N > 1 the `serve` command becomes this supervisor: it
applies the migrations once (so the workers do not race Alembic), then starts N workers, each
`python -m bot serve --worker-index I` (an internal, hidden option: "you are worker I, listen with
SO_REUSEPORT and never fork"). They all bind the same host:port and the kernel spreads connections over them.
Each worker is a whole bot with its own engine, outbox and triggers; they share the work through the database
as separate processes do (leases, `FOR UPDATE SKIP LOCKED` on PostgreSQL, the cross-process write lock on
SQLite: see `bot.store.db`).

The supervisor forwards SIGTERM and SIGINT to the workers and waits for them (exit status 0 when they stop
cleanly). A worker that dies on its own is logged with its exit status or signal and started again after a
short backoff; one that dies within `QUICK_DEATH` of starting `GIVE_UP_AFTER` times in a row (a bad
configuration, a port taken) makes the supervisor stop the others and exit non-zero.

Workers run in their own process group, so a Ctrl-C in the terminal reaches them once, through the
supervisor (aiohttp's shutdown does not survive a second signal well); each worker also stops by itself when
its supervisor disappears (`watch_supervisor`), so a supervisor killed with SIGKILL leaves no worker holding
the port.

The workers also share a private directory for their metrics (see `bot.metrics`), so `GET /metrics` answers the
same totals whichever worker takes the connection; the supervisor removes it when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bot.metrics import SHARED_DIR_VARIABLE

log = logging.getLogger("relaybot.workers")

QUICK_DEATH = 10.0  # seconds: a worker that dies sooner than this after its start "keeps dying"
GIVE_UP_AFTER = 5  # quick deaths in a row of one worker before the supervisor gives up
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 5.0  # seconds before a dead worker is started again; doubles per quick death
STOP_GRACE = 30.0  # seconds the workers get to stop after SIGTERM before they are killed


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:  # a real-time signal has no name
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def worker_command(index: int, *, port: int) -> list[str]:
    return [sys.executable, "-m", "bot", "serve", "--port", str(port), "--worker-index", str(index)]


@dataclass
class Supervisor:
    count: int
    port: int
    quick_death: float = QUICK_DEATH
    give_up_after: int = GIVE_UP_AFTER
    stop_grace: float = STOP_GRACE
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _failure: str | None = None
    _environment: dict[str, str] = field(default_factory=dict)

    async def run(self) -> int:
        """Start the workers and keep them running until a signal or too many quick deaths; the exit status."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        metrics_dir = tempfile.mkdtemp(prefix="relaybot-metrics-")  # fresh: values of an earlier run must not count
        self._environment = {**os.environ, SHARED_DIR_VARIABLE: metrics_dir}
        log.info("relaybot: the workers keep their metrics in %s", metrics_dir)
        try:
            statuses = await asyncio.gather(*(self._keep_running(index) for index in range(self.count)))
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if self._failure is not None:
            log.error("relaybot: stopped all workers: %s", self._failure)
            return 1
        # A worker stopped before it had set up its own handlers dies of the SIGTERM itself: stopped as asked.
        unclean = {index: status for index, status in enumerate(statuses) if status not in (0, -signal.SIGTERM)}
        if unclean:
            log.error("relaybot: workers did not stop cleanly: %s",
                      ", ".join(f"worker {index} {describe_exit(status)}" for index, status in unclean.items()))
            return 1
        log.info("relaybot: all %d workers stopped", self.count)
        return 0

    def _on_signal(self, signum: int) -> None:
        log.info("relaybot: %s received, stopping the workers", signal.Signals(signum).name)
        self._stopping.set()

    async def _keep_running(self, index: int) -> int:
        """Worker `index`, started again whenever it dies, until the supervisor stops; its last exit status."""
        quick_deaths = 0
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                process = await asyncio.create_subprocess_exec(*worker_command(index, port=self.port),
                                                               process_group=0, env=self._environment)
                log.info("relaybot: worker %d started, pid %d", index, process.pid)
                exited = asyncio.create_task(process.wait())
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if self._stopping.is_set():
                    exited.cancel()
                    return await self._stop(process)
                returncode = exited.result()
                quick_deaths = quick_deaths + 1 if time.monotonic() - started < self.quick_death else 0
                log.error("relaybot: worker %d (pid %d) %s", index, process.pid, describe_exit(returncode))
                if quick_deaths >= self.give_up_after:
                    self._failure = (f"worker {index} died within {self.quick_death:g} s of starting "
                                     f"{quick_deaths} times in a row (last: {describe_exit(returncode)}); "
                                     "see its log above")
                    self._stopping.set()
                    return returncode
                backoff = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(quick_deaths - 1, 0))
                log.info("relaybot: starting worker %d again in %g s", index, backoff)
                await asyncio.wait({stopping}, timeout=backoff)
            return 0
        finally:
            stopping.cancel()

    async def _stop(self, process: asyncio.subprocess.Process) -> int:
        """SIGTERM, and SIGKILL if the worker is still running after `stop_grace`; its exit status."""
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.wait(), timeout=self.stop_grace)
        except TimeoutError:
            log.error("relaybot: worker pid %d did not stop within %g s; killing it", process.pid, self.stop_grace)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            return await process.wait()


async def watch_supervisor(supervisor_pid: int, *, interval: float = 1.0) -> None:
    """In a worker: SIGTERM to itself (a clean stop) once its supervisor is gone and it was adopted."""
    while True:  # a process cannot be woken by its parent's death without Linux-only calls: look every second
        await asyncio.sleep(interval)
        if os.getppid() != supervisor_pid:
            break
    log.error("relaybot: the supervisor (pid %d) is gone; this worker stops", supervisor_pid)
    os.kill(os.getpid(), signal.SIGTERM)
