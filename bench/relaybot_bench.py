#!/usr/bin/env python3
"""Benchmark `relaybot serve` the way the n8n harness measures n8n (same wrk load generator, same body).

    .venv/bin/python bench/relaybot_bench.py                       # SQLite, levels 1,16,64, 200 req/s phase
    .venv/bin/python bench/relaybot_bench.py --waiting 10000       # + 10,000 runs waiting for approval (RSS)
    .venv/bin/python bench/relaybot_bench.py --db postgres --processes 2

What runs, all on loopback, every port chosen free except none fixed:
- `bench/fake_slack_relay.py` (a separate process): the n8n harness's `fake_slack.py` counters for the cards
  (top-level `chat.postMessage`), and relaybot's own Slack emulator for everything else (auth.test, users.info,
  response_url for the slash-command replies); thread replies and `chat.update` are answered and counted.
- `relaybot serve` (one or more processes): SQLite in a temp dir (or a new PostgreSQL database),
  RELAYBOT_SLACK_CHANNEL_RATE=0, the catalog = the workflow below, written to the temp workflows dir.
- set-up as a user does it: the signed slash command `/relay enable bench-pr-opened` → the ephemeral reply
  shows the new `webhook` connection's URL and secret.
- load: the harness's `loadgen.py` (imported, not copied): per level a warm-up, a wrk window, a drain; probes
  (timestamped PR titles) measure webhook → card at the fake Slack. Two differences for relaybot, both in this
  file: wrk's script `pr_opened_auth.lua` adds `Authorization: Bearer <secret>` (and round-robin over several
  processes), and the probes carry the same header.
- a fixed-rate phase (`--rate`, open loop, aiohttp): every request is a probe, so accept p50/p99 and
  webhook → card p50/p99 are over all of them.
- `--waiting N`: a fresh bot with a workflow whose step needs approval; N webhooks → N runs waiting with
  their cards posted; resident memory before and after.

The workflow is the n8n one (Webhook → IF action == "opened" → chat.postMessage), as relaybot YAML:

    on: webhook
    if: event.action == "opened"
    card: {title: "PR #… opened in …: <title>", text: "by … (+…/-…)", link: …, fields: {Repository, Base}}

Each run also writes its audit thread (run started, run finished) and refreshes its card (`chat.update`):
that is relaybot's product, so it is part of the work measured. Prints tables; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_HARNESS = os.environ.get("N8N_HARNESS", "/work/shared/bench/n8n")
DRAIN_CARDS_TO_REPORT = 1000  # fewer cards after the window (no backlog): the drain's CPU per card means nothing
PG_ADMIN_DSN = os.environ.get("RELAYBOT_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")

LOAD_WORKFLOW = """\
name: bench-pr-opened
title: Pull request opened
description: The n8n benchmark's workflow (Webhook → IF action == opened → Slack card), for relaybot.
on: webhook
if: event.action == "opened"
card:
  title: "PR #${{ event.pull_request.number }} opened in ${{ event.repository.full_name }}: \
${{ event.pull_request.title }}"
  text: "by ${{ event.pull_request.user.login }} \
(+${{ event.pull_request.additions }}/-${{ event.pull_request.deletions }})"
  link: "${{ event.pull_request.html_url }}"
  fields:
    Repository: "${{ event.repository.full_name }}"
    Base: "${{ event.pull_request.base.ref }}"
"""

WAITING_WORKFLOW = """\
name: bench-approval
title: Pull request waiting for approval
on: webhook
if: event.action == "opened"
card:
  title: "PR #${{ event.pull_request.number }}: ${{ event.pull_request.title }}"
steps:
  - id: gate
    title: Say it was approved
    approval: required
    uses: slack.post
    with: {text: "approved", thread: true}
"""


def log(message: str) -> None:
    print(f"[relaybot_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile, as fake_slack.py computes it."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100.0 * (len(ordered) - 1))))
    return ordered[index]


def read_json(path: str | Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def write_json(path: str | Path, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, default=str)


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


# ---------------------------------------------------------------------------------------------- processes


class Session:
    """A fake Slack, one or more `relaybot serve` processes on one database, and the enabled workflow."""

    def __init__(self, args: argparse.Namespace, *, workflow_name: str, workflow_text: str, tag: str) -> None:
        self.args = args
        self.workflow_name = workflow_name
        self.workflow_text = workflow_text
        self.tag = tag
        self.tmp = Path(tempfile.mkdtemp(prefix=f"relaybot-bench-{tag}-"))
        self.slack_proc: asyncio.subprocess.Process | None = None
        self.slack: dict[str, Any] = {}
        self.bots: list[asyncio.subprocess.Process] = []
        self.ports: list[int] = []
        self.database_url = ""
        self.pg_database: str | None = None
        self.hook_path = ""
        self.secret = ""
        self.http: aiohttp.ClientSession | None = None

    @property
    def slack_url(self) -> str:
        return str(self.slack["url"])

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}{self.hook_path}" for port in self.ports]

    @property
    def bot_pids(self) -> list[int]:
        return [proc.pid for proc in self.bots]

    async def start(self) -> Session:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        workflows = self.tmp / "workflows"
        workflows.mkdir()
        (workflows / f"{self.workflow_name}.yml").write_text(self.workflow_text)
        await self._start_slack()
        await self._database()
        for index in range(self.args.processes):
            await self._start_bot(index, workflows)
        await self._enable()
        return self

    async def _start_slack(self) -> None:
        self.slack_proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "fake_slack_relay.py"), "--harness", self.args.harness,
            "--front", self.args.fake_slack_front, env=self._source_env(dict(os.environ)),
            stdout=asyncio.subprocess.PIPE, stderr=(self.tmp / "fake_slack.log").open("wb"), cwd=ROOT)
        assert self.slack_proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.slack_proc.stdout.readline(), 30)
        except TimeoutError:
            line = b""
        if not line:
            raise RuntimeError(f"fake Slack did not start:\n{(self.tmp / 'fake_slack.log').read_text()}")
        self.slack = json.loads(line)
        log(f"{self.tag}: fake Slack pid {self.slack_proc.pid} at {self.slack_url} "
            f"(front: {self.args.fake_slack_front})")

    async def _database(self) -> None:
        if self.args.db == "sqlite":
            self.database_url = f"sqlite+aiosqlite:///{self.tmp / 'relaybot.db'}"
            return
        import asyncpg

        name = f"relaybot_bench_{uuid.uuid4().hex[:10]}"
        try:
            admin = await asyncpg.connect(self.args.pg_dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise RuntimeError(f"PostgreSQL mode: no server at {self.args.pg_dsn}: {problem}") from None
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        self.pg_database = name
        base = self.args.pg_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        self.database_url = f"{base}/{name}"
        log(f"{self.tag}: PostgreSQL database {name}")

    def _source_env(self, env: dict[str, str]) -> dict[str, str]:
        if self.args.source:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.args.source, env.get("PYTHONPATH")]))
        return env

    def _environment(self, port: int, workflows: Path) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("SLACK_", "RELAYBOT_"))}
        env.update({
            "SLACK_SIGNING_SECRET": self.slack["signing_secret"],
            "SLACK_BOT_TOKEN": self.slack["token"],
            "SLACK_API_URL": self.slack["api_url"],
            "RELAYBOT_DATABASE_URL": self.database_url,
            "RELAYBOT_MASTER_KEYS": self.args.master_key,
            "RELAYBOT_WORKFLOWS_DIR": str(workflows),
            "RELAYBOT_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "RELAYBOT_SLACK_CHANNEL_RATE": "0",
            "RELAYBOT_HOST": "127.0.0.1",
            "PORT": str(port),
        })
        env = self._source_env(env)
        for item in self.args.env:
            key, _, value = item.partition("=")
            env[key] = value
        return env

    async def _start_bot(self, index: int, workflows: Path) -> None:
        port = free_port()
        logfile = self.tmp / f"serve-{index}.log"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "serve", "--workers", str(self.args.workers),
            env=self._environment(port, workflows), cwd=self.tmp,
            stdout=logfile.open("ab"), stderr=asyncio.subprocess.STDOUT)
        self.bots.append(proc)
        self.ports.append(port)
        assert self.http is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"relaybot serve exited with {proc.returncode}:\n{logfile.read_text()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        log(f"{self.tag}: relaybot serve #{index} pid {proc.pid} on :{port} ({self.args.db})")
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"relaybot serve did not become healthy:\n{logfile.read_text()}")

    async def _enable(self) -> None:
        assert self.http is not None
        async with self.http.post(f"{self.slack_url}/bench/command",
                                  json={"text": f"enable {self.workflow_name}",
                                        "bot_url": f"http://127.0.0.1:{self.ports[0]}"}) as response:
            answer = await response.json()
        connection = answer.get("connection")
        if not answer.get("ok") or not connection or not connection.get("secret"):
            raise RuntimeError(f"`/relay enable {self.workflow_name}` gave no webhook connection: {answer}")
        self.hook_path = f"/hooks/{connection['connection_id']}"
        self.secret = connection["secret"]
        log(f"{self.tag}: enabled {self.workflow_name}; webhook connection {self.hook_path}")

    async def stats(self) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get(f"{self.slack_url}/stats") as response:
            return dict(await response.json())

    async def reset(self) -> None:
        assert self.http is not None
        async with self.http.post(f"{self.slack_url}/reset") as response:
            await response.read()

    async def metrics(self, port: int | None = None) -> dict[str, float]:
        """Sums of relaybot's Prometheus series over all processes, or one (labels dropped)."""
        assert self.http is not None
        totals: dict[str, float] = {}
        for each in self.ports if port is None else [port]:
            async with self.http.get(f"http://127.0.0.1:{each}/metrics") as response:
                text = await response.text()
            for line in text.splitlines():
                match = re.match(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+)$", line)
                if match:
                    totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(2))
        return totals

    async def events_per_process(self) -> list[float]:
        return [(await self.metrics(port)).get("relaybot_events_received_total", 0.0) for port in self.ports]

    def rss_mb(self, loadgen: ModuleType) -> float:
        pids = {p for pid in self.bot_pids for p in loadgen.tree(pid)}  # a set: the patched tree() groups them
        return round(loadgen.rss_kb(sorted(pids)) / 1024, 1)

    def run_states(self) -> dict[str, int]:
        if self.args.db == "sqlite":
            with contextlib.closing(sqlite3.connect(f"file:{self.tmp / 'relaybot.db'}?mode=ro", uri=True)) as db:
                return dict(db.execute("select state, count(*) from runs group by state").fetchall())
        return {}

    async def pg_run_states(self) -> dict[str, int]:
        if self.pg_database is None:
            return self.run_states()
        import asyncpg

        dsn = self.args.pg_dsn.rsplit("/", 1)[0] + "/" + self.pg_database
        connection = await asyncpg.connect(dsn)
        try:
            rows = await connection.fetch("select state, count(*) from runs group by state")
        finally:
            await connection.close()
        return {row[0]: row[1] for row in rows}

    async def stop(self) -> None:
        for proc in self.bots:
            await _terminate(proc, 15)
        if self.slack_proc is not None:
            await _terminate(self.slack_proc, 5)
        if self.http is not None:
            await self.http.close()
        if self.pg_database and self.args.keep:
            log(f"{self.tag}: kept PostgreSQL database {self.pg_database}")
        elif self.pg_database:
            import asyncpg

            admin = await asyncpg.connect(self.args.pg_dsn)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{self.pg_database}" WITH (FORCE)')
            finally:
                await admin.close()
        if self.args.keep:
            log(f"{self.tag}: kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


async def _terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# ---------------------------------------------------------------------------------------------- load phases


def patch_loadgen(loadgen: ModuleType, session: Session, secret: str) -> None:
    """Point the harness's loadgen at relaybot: signed probes, several processes counted as one system."""
    original_tree = loadgen.tree
    leader = session.bot_pids[0]

    def tree(pid: int) -> list[int]:
        if pid == leader:
            return [p for bot in session.bot_pids for p in original_tree(bot)]
        return list(original_tree(pid))

    async def probes(args: argparse.Namespace, body_tmpl: dict[str, Any], stop_at: float, sent: list[Any]) -> None:
        """loadgen.probes with `Authorization: Bearer`, round-robin over the processes; 2xx is recorded as 200
        (loadgen counts a probe as accepted when its status is 200; relaybot answers 202)."""
        if args.probe_rate <= 0:
            return
        urls = session.urls
        headers = {"X-GitHub-Event": "pull_request", "Authorization": f"Bearer {secret}"}
        timeout = aiohttp.ClientTimeout(total=args.req_timeout)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as http:
            tasks = []

            async def one(i: int) -> None:
                body = json.loads(json.dumps(body_tmpl))
                t = time.time()
                body["pull_request"]["title"] = f"probe t={t:.6f} #{i}"
                try:
                    async with http.post(urls[i % len(urls)], json=body, headers=headers) as response:
                        await response.read()
                        sent.append((200 if 200 <= response.status < 300 else response.status, time.time() - t))
                except Exception as exc:
                    sent.append((repr(exc), time.time() - t))

            period = 1.0 / args.probe_rate
            start = time.monotonic()
            for i in range(int((stop_at - time.monotonic()) * args.probe_rate) + 1):
                delay = start + i * period - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() >= stop_at:
                    break
                tasks.append(asyncio.create_task(one(i)))
            if tasks:
                await asyncio.wait(tasks, timeout=args.req_timeout + 5)

    loadgen.tree = tree
    loadgen.probes = probes
    os.environ["BENCH_AUTH"] = f"Bearer {secret}"
    os.environ["BENCH_TARGETS"] = ",".join(f"127.0.0.1:{port}" for port in session.ports) if len(
        session.ports) > 1 else ""


async def smoke(session: Session, body: bytes) -> None:
    """One signed webhook must give a 202 and a card at the fake Slack."""
    assert session.http is not None
    await session.reset()
    async with session.http.post(session.urls[0], data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {session.secret}"}) as response:
        status, text = response.status, await response.text()
    if status != 202:
        raise RuntimeError(f"smoke webhook answered {status}: {text}")
    deadline = time.monotonic() + 20
    while (await session.stats())["count"] < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"smoke webhook ({text}) gave no card at the fake Slack: {await session.stats()}")
        await asyncio.sleep(0.05)
    log(f"{session.tag}: smoke ok: 202 {text} → card at the fake Slack")


async def settle(session: Session, cards: int, quiet: float, limit: float) -> tuple[dict[str, Any], bool]:
    """Wait until the fake Slack has `cards` cards and no Slack call of any kind came for `quiet` s."""
    deadline = time.monotonic() + limit
    last: tuple[int, int, int] | None = None
    changed = time.monotonic()
    while True:
        stats = await session.stats()
        seen = (stats["count"], stats["replies"], stats["updates"])
        now = time.monotonic()
        if seen != last:
            last, changed = seen, now
        if stats["count"] >= cards and now - changed >= quiet:
            return stats, True
        if now > deadline:
            return stats, False
        await asyncio.sleep(0.25)


def level_summary(row: dict[str, Any]) -> dict[str, Any]:
    requests = row["wrk_requests"]
    accepted = requests - row["errors"].get("status", 0)
    accepted_rps = row["wrk_rps"] * accepted / requests if requests else 0.0
    probe = row["probe_e2e"]
    return {
        "rep": row["rep"], "conns": row["conns"], "accepted": accepted, "accepted_rps": round(accepted_rps, 1),
        "accept_p50_ms": row["lat_p50_ms"], "accept_p99_ms": row["lat_p99_ms"], "errors": row["errors_total"],
        "e2e_p50_ms": probe["p50_ms"], "e2e_p99_ms": probe["p99_ms"], "e2e_max_ms": probe["max_ms"],
        "probes": probe["n"], "cards": row["msgs_bench"], "cards_per_s_window": row["e2e_rate_in_window"],
        "cards_per_s_sustained": row["e2e_rate_sustained"], "missing": row["missing"],
        "backlog": row["backlog_at_end"], "drain_s": row["drain_s"], "cpu_pct": row["sut_cpu_pct"],
        "slack_cpu_pct": row["aux_cpu_pct"], "busy_pct": row["machine_busy_pct"], "rss_after_mb": row["rss_after_mb"],
        "rss_peak_mb": row["rss_peak_mb"], "db_growth_mb": row["watch_growth_mb"],
        "loadavg_before": row["loadavg_before"],
    }


def print_levels(label: str, rows: list[dict[str, Any]]) -> None:
    header = ("rep", "conn", "accept/s", "acc p50ms", "acc p99ms", "errs", "e2e p50ms", "e2e p99ms", "cards",
              "cards/s", "sust/s", "missing", "drain_s", "botCPU%", "slkCPU%", "busy%", "rssMB")
    print(f"== {label}: webhook accept (wrk) and webhook → card (probes at the fake Slack)")
    print(" ".join(f"{h:>9}" for h in header))
    for r in rows:
        values = (r["rep"], r["conns"], f"{r['accepted_rps']:.1f}", f"{r['accept_p50_ms']:.1f}",
                  f"{r['accept_p99_ms']:.1f}", r["errors"], _fmt(r["e2e_p50_ms"]), _fmt(r["e2e_p99_ms"]), r["cards"],
                  f"{r['cards_per_s_window']:.1f}", f"{r['cards_per_s_sustained']:.1f}", r["missing"],
                  _fmt(r["drain_s"], 2), _fmt(r["cpu_pct"], 0), _fmt(r["slack_cpu_pct"], 0),
                  _fmt(r["busy_pct"], 0), _fmt(r["rss_after_mb"], 0))
        print(" ".join(f"{v!s:>9}" for v in values))
    print("   CPU per card, ms, from the window's start to the last card (drain included): "
          + "; ".join(f"c={r['conns']}: " + ", ".join(f"{part} {ms:.2f}" for part, ms in r["cpu_ms_per_card"].items())
                      for r in rows if "cpu_ms_per_card" in r))
    print("   the drain alone (cards, no webhooks to accept; busy = the machine over the drain and the quiet spell "
          "after it): " + "; ".join(
              f"c={r['conns']}: " + ", ".join(f"{part} {ms:.2f}" for part, ms in r["cpu_ms_per_card_drain"].items())
              + f", busy {r['drain_busy_pct']:.0f}%" for r in rows if "cpu_ms_per_card_drain" in r))
    for r in rows:
        machine_ms = r.get("cpu_ms_per_card", {}).get("machine")
        if machine_ms and r["cards_per_s_sustained"]:
            ceiling = 1000.0 * (os.cpu_count() or 1) / machine_ms
            print(f"   c={r['conns']}: with every core busy at this CPU per card the machine would post at most "
                  f"{ceiling:.0f} cards/s, {ceiling / r['cards_per_s_sustained']:.2f}× this run's sustained rate")


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _postgres_ticks() -> int:
    """CPU ticks of every `postgres` process so far, backends that exited included: the server's main process
    reaps them, and their time is added to its own children's time."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/comm") as comm:
                if comm.read().strip() != "postgres":
                    continue
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
            with open(f"/proc/{fields[1]}/comm") as parent:
                if parent.read().strip() != "postgres":  # the server's main process
                    total += int(fields[13]) + int(fields[14])  # cutime + cstime: exited backends
    return total


def cpu_by_part(session: Session, loadgen: ModuleType) -> dict[str, float]:
    """CPU seconds used so far by each part of the set-up. `load`: this process (probes) and its finished
    children (every wrk run); `postgres`: every `postgres` process, exited ones included."""
    own = os.times()
    with open("/proc/stat") as f:
        jiffies = [int(x) for x in f.readline().split()[1:]]
    ticks = loadgen.CLK_TCK
    return {
        "relaybot": loadgen.cpu_ticks(loadgen.tree(session.bot_pids[0])) / ticks,
        "postgres": _postgres_ticks() / ticks,
        # its tree: the C front is a child process
        "fake_slack": loadgen.cpu_ticks(loadgen.tree(session.slack_proc.pid)) / ticks if session.slack_proc else 0.0,
        "load": own.user + own.system + own.children_user + own.children_system,
        "machine": (sum(jiffies) - jiffies[3] - jiffies[4]) / ticks,  # not idle, not waiting for I/O
        "wall": time.monotonic(),
    }


def cpu_per_card(start: dict[str, float], end: dict[str, float], cards: int) -> dict[str, float]:
    """Milliseconds of CPU per card posted, by part, from the start of the measured window to the last card;
    `rest` is what the machine spent beyond the parts named."""
    used = {part: end[part] - start[part] for part in start if part != "wall"}
    used["rest"] = used["machine"] - sum(v for k, v in used.items() if k != "machine")
    return {part: round(1000.0 * seconds / max(1, cards), 3) for part, seconds in used.items()}


async def run_levels(args: argparse.Namespace, session: Session, loadgen: ModuleType) -> list[dict[str, Any]]:
    options = argparse.Namespace(
        url=session.urls[0], slack=session.slack_url, pid=session.bot_pids[0],
        aux_pid=loadgen.tree(session.slack_proc.pid) if session.slack_proc else [], label=args.label,
        levels=args.levels,
        repeats=args.repeats, duration=args.duration, warmup=args.warmup, threads_max=2, max_req=args.max_req,
        req_timeout=10, quiet=args.quiet, drain_max=args.drain_max, probe_rate=args.probe_rate,
        watch=[str(session.tmp / "relaybot.db*")] if args.db == "sqlite" else [],
        lua=str(HERE / "pr_opened_auth.lua"), body=str(Path(args.harness) / "pr_opened.json"), wrk=args.wrk)
    body_tmpl = read_json(options.body)
    rows = []
    # The measured window starts at loadgen's first machine_ticks() of a level (after its warm-up).
    window: dict[str, dict[str, float]] = {}
    machine_ticks = loadgen.machine_ticks

    def machine_ticks_marking_the_window() -> tuple[int, int]:
        # loadgen reads the machine's ticks twice per level: as the wrk window starts and as it ends.
        window.setdefault("end" if "start" in window else "start", cpu_by_part(session, loadgen))
        return machine_ticks()

    loadgen.machine_ticks = machine_ticks_marking_the_window
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for rep in range(1, args.repeats + 1):
                for conns in args.levels:
                    window.clear()
                    row = await loadgen.one_level(options, http, body_tmpl, conns, rep)
                    end = cpu_by_part(session, loadgen)  # one_level returns after the last card and a quiet spell
                    summary = level_summary(row)
                    summary["cpu_ms_per_card"] = cpu_per_card(window["start"], end, row["msgs_total"])
                    drained = row["msgs_total"] - row["msgs_at_load_end"]
                    if drained >= DRAIN_CARDS_TO_REPORT:  # the drain alone: cards only, no webhooks to accept
                        summary["cpu_ms_per_card_drain"] = cpu_per_card(window["end"], end, drained)
                        drain_cpu = end["machine"] - window["end"]["machine"]
                        drain_wall = (end["wall"] - window["end"]["wall"]) * (os.cpu_count() or 1)
                        summary["drain_busy_pct"] = round(100.0 * drain_cpu / max(1e-9, drain_wall), 1)
                    summary["raw"] = {k: v for k, v in row.items() if k != "raw"}
                    rows.append(summary)
                    log(f"c={conns}: {summary['accepted_rps']} accepted/s p99 {summary['accept_p99_ms']} ms, "
                        f"e2e p50/p99 {summary['e2e_p50_ms']}/{summary['e2e_p99_ms']} ms, "
                        f"{summary['cards_per_s_sustained']} cards/s sustained, missing {summary['missing']}")
    finally:
        loadgen.machine_ticks = machine_ticks
    return rows


async def fixed_rate(args: argparse.Namespace, session: Session, loadgen: ModuleType) -> dict[str, Any]:
    """Open loop at `--rate` req/s for `--rate-duration` s; every request is a timestamped probe.

    Also the bot's CPU time per run (its process tree, from the first request until every card is posted):
    on a shared machine whose speed drifts by ±15 % within minutes, CPU per run moves less than req/s does."""
    body_path = Path(args.harness) / "pr_opened.json"
    template = json.loads(body_path.read_text())
    template["pull_request"]["title"] = "@@TITLE@@"
    raw = json.dumps(template).encode()
    urls = session.urls
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "pull_request",
               "Authorization": f"Bearer {session.secret}"}
    await session.reset()
    total = int(args.rate * args.rate_duration)
    results: list[tuple[int | str, float]] = []
    lateness: list[float] = []
    before = await session.metrics()
    bot_tree = sorted({p for pid in session.bot_pids for p in loadgen.tree(pid)})
    cpu_before = loadgen.cpu_ticks(bot_tree)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                     connector=aiohttp.TCPConnector(limit=512)) as http:

        async def one(i: int) -> None:
            t = time.time()
            body = raw.replace(b"@@TITLE@@", f"probe t={t:.6f} #{i}".encode())
            start = time.perf_counter()
            try:
                async with http.post(urls[i % len(urls)], data=body, headers=headers) as response:
                    await response.read()
                    results.append((response.status, time.perf_counter() - start))
            except Exception as exc:
                results.append((repr(exc), time.perf_counter() - start))

        tasks = []
        start = time.monotonic() + 0.2
        for i in range(total):
            due = start + i / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            lateness.append(time.monotonic() - due)
            tasks.append(asyncio.create_task(one(i)))
        sending = time.monotonic() - start  # the schedule's span; the last answers may come later
        await asyncio.gather(*tasks)
    accepted = [latency for status, latency in results if status == 202]
    stats, drained = await settle(session, len(accepted), args.quiet, args.drain_max)
    # settle() waited `--quiet` seconds of silence after the last card: idle time, a little CPU (polls, timers).
    cpu_ms = 1000.0 * (loadgen.cpu_ticks(bot_tree) - cpu_before) / loadgen.CLK_TCK
    after = await session.metrics()
    result = {
        "rate": args.rate, "duration_s": args.rate_duration, "sent": total, "accepted": len(accepted),
        "other": {str(s): sum(1 for x, _ in results if x == s) for s in {x for x, _ in results if x != 202}},
        "achieved_rps": round((total - 1) / sending, 1) if total > 1 and sending > 0 else float(total),
        "accept_p50_ms": _ms(pct(accepted, 50)), "accept_p99_ms": _ms(pct(accepted, 99)),
        "accept_max_ms": _ms(max(accepted) if accepted else None),
        "e2e_p50_ms": stats["probe"]["p50_ms"], "e2e_p99_ms": stats["probe"]["p99_ms"],
        "e2e_max_ms": stats["probe"]["max_ms"], "cards": stats["count"], "drained": drained,
        "generator_late_p99_ms": _ms(pct(lateness, 99)), "generator_late_max_ms": _ms(max(lateness)),
        "bot_cpu_ms_per_run": round(cpu_ms / stats["count"], 3) if stats["count"] else None,
        "events_received": after.get("relaybot_events_received_total", 0)
        - before.get("relaybot_events_received_total", 0),
        "loadavg": loadavg(),
    }
    print(f"== fixed rate {args.rate:g} req/s for {args.rate_duration:g} s (open loop, aiohttp; every request a probe)")
    print(f"   sent {total} at {result['achieved_rps']}/s, accepted {len(accepted)}, other {result['other']}; "
          f"accept p50 {result['accept_p50_ms']} ms p99 {result['accept_p99_ms']} ms max {result['accept_max_ms']} ms")
    print(f"   webhook → card p50 {result['e2e_p50_ms']} ms p99 {result['e2e_p99_ms']} ms "
          f"max {result['e2e_max_ms']} ms; cards {stats['count']} (drained: {drained}); "
          f"generator late p99 {result['generator_late_p99_ms']} ms")
    print(f"   bot CPU per run (webhook accepted, run started and finished, card and reply posted): "
          f"{result['bot_cpu_ms_per_run']} ms")
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def waiting_runs(args: argparse.Namespace, loadgen: ModuleType) -> dict[str, Any]:
    """A fresh bot; `--waiting` runs that wait for approval; resident memory before and after."""
    session = Session(args, workflow_name="bench-approval", workflow_text=WAITING_WORKFLOW, tag="waiting")
    try:
        await session.start()
        template = json.loads((Path(args.harness) / "pr_opened.json").read_text())
        template["pull_request"]["title"] = "@@TITLE@@"
        raw = json.dumps(template).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {session.secret}"}
        await session.reset()
        assert session.http is not None
        sent = 0

        async def fire(count: int) -> int:
            nonlocal sent
            queue = iter(range(sent, sent + count))
            sent += count
            statuses: list[int] = []

            async def worker(k: int) -> None:
                for i in queue:
                    body = raw.replace(b"@@TITLE@@", f"waiting #{i}".encode())
                    async with session.http.post(session.urls[i % len(session.urls)], data=body,  # type: ignore[union-attr]
                                                 headers=headers) as response:
                        await response.read()
                        statuses.append(response.status)

            await asyncio.gather(*(worker(k) for k in range(args.waiting_concurrency)))
            return sum(1 for s in statuses if s == 202)

        warm = await fire(args.waiting_warmup)
        _stats, ok = await settle(session, warm, args.quiet, args.drain_max)
        await asyncio.sleep(1)
        rss_before = session.rss_mb(loadgen)
        log(f"waiting: {warm} warm-up runs waiting; RSS {rss_before} MB; firing {args.waiting} more")
        t0 = time.monotonic()
        accepted = await fire(args.waiting)
        accept_s = time.monotonic() - t0
        stats, drained = await settle(session, warm + accepted, args.quiet, max(args.drain_max, 600))
        all_cards_s = time.monotonic() - t0 - args.quiet
        await asyncio.sleep(2)
        rss_after = session.rss_mb(loadgen)
        states = await session.pg_run_states()
        metrics = await session.metrics()
        result = {
            "warmup_runs": warm, "runs": args.waiting, "accepted": accepted, "accept_s": round(accept_s, 1),
            "all_cards_s": round(all_cards_s, 1), "cards": stats["count"], "replies": stats["replies"],
            "drained": drained and ok, "run_states": states, "rss_before_mb": rss_before, "rss_after_mb": rss_after,
            "rss_added_mb": round(rss_after - rss_before, 1),
            "outbox_depth": metrics.get("relaybot_outbox_depth"), "inbox_depth": metrics.get("relaybot_inbox_depth"),
            "loadavg": loadavg(),
        }
        print(f"== {args.waiting} runs waiting for approval (fresh bot, {warm} warm-up runs first)")
        print(f"   accepted {accepted} in {accept_s:.1f} s; all cards posted after {all_cards_s:.1f} s "
              f"(cards {stats['count']}, thread replies {stats['replies']}, drained {result['drained']}); "
              f"runs by state {states}")
        print(f"   RSS {rss_before} MB → {rss_after} MB: +{result['rss_added_mb']} MB")
        return result
    finally:
        await session.stop()


# ---------------------------------------------------------------------------------------------- profiling


async def start_profile(args: argparse.Namespace, pid: int, seconds: float) -> asyncio.subprocess.Process | None:
    """py-spy on the bot (collapsed stacks). --nonblocking does not stop the bot to sample it, but it cannot be
    combined with --native."""
    if not args.profile:
        return None
    options = ["--native"] if args.profile_native else ["--nonblocking"]
    if args.profile_gil:
        options.append("--gil")
    return await asyncio.create_subprocess_exec(
        args.py_spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", *options,
        "--duration", str(int(seconds)), "--output", args.profile,
        stdout=asyncio.subprocess.DEVNULL, stderr=open(f"{args.profile}.log", "wb"))  # noqa: ASYNC230


def summarize_profile(path: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with open(path) as handle:
        for line in handle:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count

    def share(table: dict[str, int]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / total, 1)) for name, n in sorted(table.items(), key=lambda x: -x[1])[:top]]

    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


# ---------------------------------------------------------------------------------------------- main


async def amain(args: argparse.Namespace) -> int:
    loadgen = load_module(Path(args.harness) / "loadgen.py", "n8n_loadgen")
    if shutil.which(args.wrk) is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk")
    out: dict[str, Any] = {
        "label": args.label, "db": args.db, "processes": args.processes, "workers": args.workers,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": {"nproc": os.cpu_count(), "loadavg_start": loadavg()},
        "config": {k: v for k, v in vars(args).items() if k not in ("master_key",)},
    }
    log(f"load average at start: {loadavg()} ({os.cpu_count()} cores)")
    if args.levels or args.rate > 0:
        session = Session(args, workflow_name="bench-pr-opened", workflow_text=LOAD_WORKFLOW, tag="load")
        try:
            await session.start()
            patch_loadgen(loadgen, session, session.secret)
            await smoke(session, (Path(args.harness) / "pr_opened.json").read_bytes())
            await asyncio.sleep(1)
            out["rss_start_mb"] = session.rss_mb(loadgen)
            before = await session.metrics()
            if args.levels:
                window = len(args.levels) * args.repeats * (args.duration + args.warmup + 10)
                profiler = await start_profile(args, session.bot_pids[0], window)
                out["levels"] = await run_levels(args, session, loadgen)
                if profiler is not None:
                    with contextlib.suppress(ProcessLookupError):
                        profiler.send_signal(signal.SIGINT)
                    await profiler.wait()
                    with contextlib.suppress(FileNotFoundError):
                        out["profile"] = summarize_profile(args.profile)
                print_levels(f"{args.label} ({args.db}, {args.processes} process(es) × {args.workers} worker(s))",
                             [{k: v for k, v in r.items() if k != 'raw'} for r in out["levels"]])
            if args.rate > 0:
                out["fixed_rate"] = await fixed_rate(args, session, loadgen)
            after = await session.metrics()
            out["rss_end_mb"] = session.rss_mb(loadgen)
            out["events_received"] = after.get("relaybot_events_received_total", 0) - before.get(
                "relaybot_events_received_total", 0)
            out["slack_calls"] = {k: v for k, v in after.items() if k.startswith("relaybot_slack")}
            out["outbox_depth_end"] = after.get("relaybot_outbox_depth")
            out["run_states"] = await session.pg_run_states()
            out["events_per_process"] = await session.events_per_process()
            print(f"RSS relaybot ({args.processes} process(es)): after start+smoke {out['rss_start_mb']} MB → "
                  f"after load {out['rss_end_mb']} MB; events stored {out['events_received']:.0f} "
                  f"(per process {out['events_per_process']}); "
                  f"runs by state {out['run_states']}")
            if "profile" in out:
                prof = out["profile"]
                print(f"== py-spy ({prof['samples']} samples, bot process #0, load levels): self time")
                for name, share in prof["self"][:15]:
                    print(f"   {share:5.1f}%  {name}")
                print("   inclusive:")
                for name, share in prof["inclusive"][:25]:
                    print(f"   {share:5.1f}%  {name}")
        finally:
            await session.stop()
    if args.waiting > 0:
        out["waiting"] = await waiting_runs(args, loadgen)
    out["host"]["loadavg_end"] = loadavg()
    if args.out:
        write_json(args.out, out)
        log(f"wrote {args.out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    levels = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    parser.add_argument("--levels", default="1,16,64", type=levels, help="wrk connections per level ('' = none)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5, help="seconds of each measured wrk window")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of wrk warm-up before each level")
    parser.add_argument("--probe-rate", type=float, default=2, help="timestamped probes per second during wrk")
    parser.add_argument("--quiet", type=float, default=2, help="the fake Slack must be quiet this long = drained")
    parser.add_argument("--drain-max", type=float, default=180)
    parser.add_argument("--max-req", type=int, default=200000, help="cap on requests per wrk run")
    parser.add_argument("--rate", type=float, default=200, help="fixed-rate phase, req/s (0 = skip)")
    parser.add_argument("--rate-duration", type=float, default=5)
    parser.add_argument("--waiting", type=int, default=0, help="runs left waiting for approval (0 = skip)")
    parser.add_argument("--waiting-warmup", type=int, default=200)
    parser.add_argument("--waiting-concurrency", type=int, default=16)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--processes", type=int, default=1, help="relaybot serve processes on the one database")
    parser.add_argument("--workers", type=int, default=1, help="`relaybot serve --workers N`: worker processes "
                        "sharing each serve's port (CPU and RSS count the whole process tree)")
    parser.add_argument("--fake-slack-front", choices=("auto", "c", "python"), default="auto",
                        help="the fake Slack's front for the hot requests (fake_slack_relay.py --front)")
    parser.add_argument("--pg-dsn", default=PG_ADMIN_DSN, help="admin DSN; a new database is created and dropped")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for relaybot serve")
    parser.add_argument("--source", help="run relaybot from this source tree (e.g. `git archive HEAD` unpacked) "
                        "instead of the installed one; PYTHONPATH is set for the bot processes")
    parser.add_argument("--harness", default=DEFAULT_HARNESS, help="the n8n harness (loadgen.py, pr_opened.json)")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--label", default="relaybot")
    parser.add_argument("--profile", help="py-spy collapsed-stack output file for the load levels (needs py-spy)")
    parser.add_argument("--profile-gil", action="store_true", help="py-spy --gil: only the thread holding the GIL")
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native: C frames too")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (logs, SQLite database) and the PostgreSQL database")
    parser.add_argument("--out", help="write all numbers as JSON here")
    args = parser.parse_args()
    args.master_key = base64.b64encode(os.urandom(32)).decode()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
